/* Randomized Hadamard rotation of one row, in double precision.
 *
 * One round multiplies by the round's random signs, then applies the
 * orthonormal Walsh-Hadamard transform H_B (B a power of two, d/2 < B <= d) to
 * the first B coordinates and, when B < d, to the last B coordinates. The
 * inverse runs the steps backwards (each step is orthogonal and H_B is its own
 * inverse).
 *
 * The loops are plain C that compilers vectorize across the rows of a tile.
 * Where GCC supports function multi-versioning (x86-64 Linux), an AVX2 clone is
 * chosen at load time; it performs the same IEEE additions, subtractions and
 * multiplications (no FMA contraction), so results are bit-identical to the
 * baseline clone.
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

/* The rotation is applied to a tile of TQ_TILE rows at once. The tile is
 * stored transposed, tile[j * TQ_TILE + lane] = coordinate j of row `lane`, so
 * every butterfly is a TQ_TILE-wide vector operation whatever its stride, and
 * each lane goes through the same arithmetic, in the same order, as a single
 * row would: results do not depend on which rows share a tile. */
#define TQ_TILE 16

/* Butterfly stages of stride first_h, 2 first_h, ... < length. */
static inline void tq_tile_stages(double *v, ptrdiff_t length, ptrdiff_t first_h)
{
    for (ptrdiff_t h = first_h; h < length; h *= 2) {
        for (ptrdiff_t i = 0; i < length; i += 2 * h) {
            for (ptrdiff_t j = i; j < i + h; j++) {
                double *restrict lo = v + j * TQ_TILE;
                double *restrict hi = v + (j + h) * TQ_TILE;
                for (int l = 0; l < TQ_TILE; l++) {
                    double a = lo[l], b = hi[l];
                    lo[l] = a + b;
                    hi[l] = a - b;
                }
            }
        }
    }
}

/* Walsh-Hadamard transform of a power-of-two block of tile rows, unnormalized;
 * the first two butterfly stages run as one radix-4 pass. */
static inline void tq_tile_fwht(double *v, ptrdiff_t length)
{
    if (length < 4) {
        tq_tile_stages(v, length, 1);
        return;
    }
    for (ptrdiff_t i = 0; i < length; i += 4) {
        double *restrict p0 = v + i * TQ_TILE, *restrict p1 = p0 + TQ_TILE;
        double *restrict p2 = p1 + TQ_TILE, *restrict p3 = p2 + TQ_TILE;
        for (int l = 0; l < TQ_TILE; l++) {
            double a = p0[l] + p1[l], b = p0[l] - p1[l];
            double c = p2[l] + p3[l], e = p2[l] - p3[l];
            p0[l] = a + c;
            p1[l] = b + e;
            p2[l] = a - c;
            p3[l] = b - e;
        }
    }
    tq_tile_stages(v, length, 4);
}

static inline void tq_tile_scale(double *v, ptrdiff_t coords, double factor)
{
    for (ptrdiff_t k = 0; k < coords * TQ_TILE; k++)
        v[k] *= factor;
}

static inline void tq_tile_flip_signs(double *restrict v, const double *restrict signs, ptrdiff_t d)
{
    for (ptrdiff_t j = 0; j < d; j++) {
        const double s = signs[j];
        for (int l = 0; l < TQ_TILE; l++)
            v[j * TQ_TILE + l] *= s;
    }
}

TQ_SIMD_CLONES
static void tq_hadamard_tile(double *v, const double *signs, ptrdiff_t rounds, ptrdiff_t d,
                             ptrdiff_t block, int inverse)
{
    const double factor = 1.0 / sqrt((double)block);
    double *tail = v + (d - block) * TQ_TILE;
    if (!inverse) {
        for (ptrdiff_t r = 0; r < rounds; r++) {
            tq_tile_flip_signs(v, signs + r * d, d);
            tq_tile_fwht(v, block);
            if (block < d) {
                tq_tile_scale(v, block, factor);
                tq_tile_fwht(tail, block);
                tq_tile_scale(tail, block, factor);
            }
        }
    } else {
        for (ptrdiff_t r = rounds - 1; r >= 0; r--) {
            if (block < d) {
                tq_tile_fwht(tail, block);
                tq_tile_scale(tail, block, factor);
                tq_tile_fwht(v, block);
                tq_tile_scale(v, block, factor);
            } else {
                tq_tile_fwht(v, block);
            }
            tq_tile_flip_signs(v, signs + r * d, d);
        }
    }
    if (block == d)
        tq_tile_scale(v, d, pow(factor, (double)rounds));
}

#endif /* TQ_HADAMARD_H */
