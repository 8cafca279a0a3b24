/* Small dense products for rotating a few query rows, without BLAS.
 *
 * A BLAS call for one (1, d) x (d, d) product costs more in thread hand-offs
 * (OpenBLAS wakes its pool; its spinning workers then compete with the OpenMP
 * kernels that follow) than the arithmetic. These loops are the same
 * arithmetic in a fixed order:
 *
 *   transpose = 0:  out[r, i] = sum_j mat[i, j] * x[r, j]   (x @ mat.T, the rotation)
 *   transpose = 1:  out[r, :] = sum_i x[r, i] * mat[i, :]   (x @ mat, its inverse)
 *
 * The first keeps TQ_TILE partial sums per output (lane l takes j = l mod
 * TQ_TILE) added in lane order, the second adds rows of the matrix in order,
 * so every variant of tq_tile.h gives the same bits.
 */
#ifndef TQ_MATRIX_H
#define TQ_MATRIX_H

#include <stddef.h>

#include "tq_tile.h"

#define TQ_DEFINE_SMALL_PRODUCT(T, S)                                                  \
    TQ_INLINE void tq_small_product_##S##_body(int variant, const T *x, ptrdiff_t m,    \
                                               ptrdiff_t d, const T *mat, int transpose,\
                                               T *out)                                  \
    {                                                                                   \
        (void)variant;                                                                  \
        for (ptrdiff_t r = 0; r < m; r++) {                                             \
            const T *row = x + r * d;                                                   \
            T *o = out + r * d;                                                         \
            if (transpose) {                                                            \
                for (ptrdiff_t c = 0; c < d; c++)                                       \
                    o[c] = 0;                                                           \
                for (ptrdiff_t i = 0; i < d; i++) {                                     \
                    const T a = row[i];                                                 \
                    const T *mrow = mat + i * d;                                        \
                    TQ_IVDEP for (ptrdiff_t c = 0; c < d; c++)                          \
                        o[c] += a * mrow[c];                                            \
                }                                                                       \
                continue;                                                               \
            }                                                                           \
            for (ptrdiff_t i = 0; i < d; i++) {                                         \
                const T *mrow = mat + i * d;                                            \
                T partial[TQ_TILE] = {0};                                               \
                ptrdiff_t j = 0;                                                        \
                for (; j + TQ_TILE <= d; j += TQ_TILE)                                  \
                    for (int l = 0; l < TQ_TILE; l++)                                   \
                        partial[l] += mrow[j + l] * row[j + l];                         \
                for (int l = 0; j + l < d; l++)                                         \
                    partial[l] += mrow[j + l] * row[j + l];                             \
                T sum = 0;                                                              \
                for (int l = 0; l < TQ_TILE; l++)                                       \
                    sum += partial[l];                                                  \
                o[i] = sum;                                                             \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    TQ_DEFINE_VARIANTS(tq_small_product_##S,                                            \
                       (int variant, const T *x, ptrdiff_t m, ptrdiff_t d, const T *mat, \
                        int transpose, T *out),                                         \
                       (variant, x, m, d, mat, transpose, out))

TQ_DEFINE_SMALL_PRODUCT(float, f)
TQ_DEFINE_SMALL_PRODUCT(double, d)

#endif /* TQ_MATRIX_H */
