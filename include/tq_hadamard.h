/* Randomized Hadamard rotation of one row, in double precision.
 *
 * One round multiplies by the round's random signs, then applies the
 * orthonormal Walsh-Hadamard transform H_B (B a power of two, d/2 < B <= d) to
 * the first B coordinates and, when B < d, to the last B coordinates. The
 * inverse runs the steps backwards (each step is orthogonal and H_B is its own
 * inverse).
 *
 * The loops are plain C that compilers vectorize. Where GCC supports function
 * multi-versioning (x86-64 Linux), an AVX2 clone is chosen at load time; it
 * performs the same IEEE additions, subtractions and multiplications (no FMA
 * contraction), so results are bit-identical to the baseline clone.
 */
#ifndef TQ_HADAMARD_H
#define TQ_HADAMARD_H

#include <math.h>
#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TQ_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TQ_SIMD_CLONES
#endif

/* In-place Walsh-Hadamard transform of a power-of-two block, unnormalized. */
static inline void tq_fwht_unnormalized(double *v, ptrdiff_t length)
{
    if (length == 2) {
        double a = v[0], b = v[1];
        v[0] = a + b;
        v[1] = a - b;
        return;
    }
    /* The first two butterfly stages as one radix-4 pass. */
    for (ptrdiff_t i = 0; i < length; i += 4) {
        double a = v[i] + v[i + 1], b = v[i] - v[i + 1];
        double c = v[i + 2] + v[i + 3], e = v[i + 2] - v[i + 3];
        v[i] = a + c;
        v[i + 1] = b + e;
        v[i + 2] = a - c;
        v[i + 3] = b - e;
    }
    for (ptrdiff_t h = 4; h < length; h *= 2) {
        for (ptrdiff_t i = 0; i < length; i += 2 * h) {
            double *restrict lo = v + i;
            double *restrict hi = v + i + h;
            for (ptrdiff_t j = 0; j < h; j++) {
                double a = lo[j], b = hi[j];
                lo[j] = a + b;
                hi[j] = a - b;
            }
        }
    }
}

static inline void tq_scale(double *v, ptrdiff_t length, double factor)
{
    for (ptrdiff_t j = 0; j < length; j++)
        v[j] *= factor;
}

static inline void tq_flip_signs(double *restrict v, const double *restrict signs, ptrdiff_t d)
{
    for (ptrdiff_t j = 0; j < d; j++)
        v[j] *= signs[j];
}

/* Rotate v (length d) in place; signs is (rounds, d) row-major. */
TQ_SIMD_CLONES
static void tq_hadamard_row(double *v, const double *signs, ptrdiff_t rounds, ptrdiff_t d,
                            ptrdiff_t block, int inverse)
{
    const double factor = 1.0 / sqrt((double)block);
    if (!inverse) {
        for (ptrdiff_t r = 0; r < rounds; r++) {
            tq_flip_signs(v, signs + r * d, d);
            tq_fwht_unnormalized(v, block);
            if (block < d) {
                tq_scale(v, block, factor);
                tq_fwht_unnormalized(v + (d - block), block);
                tq_scale(v + (d - block), block, factor);
            }
        }
    } else {
        for (ptrdiff_t r = rounds - 1; r >= 0; r--) {
            if (block < d) {
                tq_fwht_unnormalized(v + (d - block), block);
                tq_scale(v + (d - block), block, factor);
                tq_fwht_unnormalized(v, block);
                tq_scale(v, block, factor);
            } else {
                tq_fwht_unnormalized(v, block);
            }
            tq_flip_signs(v, signs + r * d, d);
        }
    }
    if (block == d) {
        /* One scaling for all rounds: sign flips commute with it. */
        tq_scale(v, d, pow(factor, (double)rounds));
    }
}

#endif /* TQ_HADAMARD_H */
