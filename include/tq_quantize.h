/* Quantization kernels of TurboQuant-MSE: norms, rotation, cell search and bit
 * packing of TQ_TILE rows at a time in a transposed tile (tq_tile.h).
 *
 * The cell of a unit-domain value u is the number of boundaries strictly below
 * it; cells are packed as the little-endian bit stream of _core.pyx, 8 indices
 * of b bits into b bytes. Every kernel comes in the variants of tq_tile.h, all
 * bit-identical.
 */
#ifndef TQ_QUANTIZE_H
#define TQ_QUANTIZE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "tq_hadamard.h"

/* out[l, j] = out_t(u[j, l] - centroids[cell]) for coordinates [j0, j1). */
#define TQ_DEFINE_RESIDUAL(name, tile_t, out_t, cell)                                       \
    TQ_INLINE void name(out_t *out, const tile_t *u, ptrdiff_t j0, ptrdiff_t j1,           \
                        const tile_t *bounds, int bits, const double *centroids,          \
                        ptrdiff_t count, ptrdiff_t d)                                      \
    {                                                                                      \
        for (ptrdiff_t l = 0; l < count; l++) {                                            \
            for (ptrdiff_t j = j0; j < j1; j++) {                                          \
                const tile_t v = u[(j - j0) * TQ_TILE + l];                                \
                out[l * d + j] = (out_t)((double)v - centroids[cell(bounds, bits, v)]);    \
            }                                                                              \
        }                                                                                  \
    }

#define TQ_T double
#define TQ_SUFFIX d
#include "tq_quantize_typed.h"
#undef TQ_T
#undef TQ_SUFFIX
#define TQ_T float
#define TQ_SUFFIX f
#include "tq_quantize_typed.h"
#undef TQ_T
#undef TQ_SUFFIX

#define TQ_DEFINE_QUANTIZE_KERNELS(suffix, t)                                                \
    TQ_DEFINE_VARIANTS(tq_hadamard_quantize_##suffix,                                        \
                       (int variant, const t *x, ptrdiff_t count, ptrdiff_t d,               \
                        const t *signs, ptrdiff_t rounds, ptrdiff_t block, const t *bounds,  \
                        int bits, const double *centroids, double *norms, uint8_t *codes,    \
                        ptrdiff_t row_bytes, t *residual, t *tile),                          \
                       (variant, x, count, d, signs, rounds, block, bounds, bits, centroids, \
                        norms, codes, row_bytes, residual, tile))                            \
    TQ_DEFINE_VARIANTS(tq_quantize_rows_##suffix,                                            \
                       (int variant, const t *y, ptrdiff_t count, ptrdiff_t d,               \
                        const double *norms, const double *bounds, int bits,                 \
                        const double *centroids, uint8_t *codes, ptrdiff_t row_bytes,        \
                        t *residual, double *tile),                                          \
                       (variant, y, count, d, norms, bounds, bits, centroids, codes,         \
                        row_bytes, residual, tile))

TQ_DEFINE_QUANTIZE_KERNELS(f, float)
TQ_DEFINE_QUANTIZE_KERNELS(d, double)

/* The largest float <= b: a float u is above b exactly when it is above this. */
static inline float tq_float_bound(double b)
{
    float f = (float)b;
    if ((double)f > b)
        f = nextafterf(f, -INFINITY);
    return f;
}

#endif /* TQ_QUANTIZE_H */
