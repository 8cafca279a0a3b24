/* Small dense products for rotating a few query rows, without BLAS.
 *
 * A BLAS call for one (1, d) x (d, d) product costs more in thread hand-offs
 * (OpenBLAS wakes its pool; its spinning workers then compete with the OpenMP
 * kernels that follow) than the arithmetic. This loop is the same arithmetic
 * in a fixed order:
 *
 *   out[r, :] = sum_i x[r, i] * mat[i, :]   (x @ mat; x @ M.T is x @ (M.T))
 *
 * adding the rows of the matrix in order, each output starting from zero, so
 * every variant of tq_tile.h gives the same bits.
 */
#ifndef TQ_MATRIX_H
#define TQ_MATRIX_H

#include <stddef.h>

#include "tq_tile.h"

/* Columns per block: the block's sums stay in registers. */
#define TQ_SMALL_PRODUCT_WIDTH 64

#define TQ_DEFINE_SMALL_PRODUCT(T, S)                                                  \
    TQ_INLINE void tq_small_product_##S##_columns(const T *row, ptrdiff_t d, const T *mat, \
                                                  ptrdiff_t c0, T *o)                   \
    {                                                                                   \
        T acc[TQ_SMALL_PRODUCT_WIDTH] = {0};                                            \
        for (ptrdiff_t i = 0; i < d; i++) {                                             \
            const T a = row[i];                                                         \
            const T *mrow = mat + i * d + c0;                                           \
            for (int c = 0; c < TQ_SMALL_PRODUCT_WIDTH; c++)                            \
                acc[c] += a * mrow[c];                                                  \
        }                                                                               \
        for (int c = 0; c < TQ_SMALL_PRODUCT_WIDTH; c++)                                \
            o[c0 + c] = acc[c];                                                         \
    }                                                                                   \
    TQ_INLINE void tq_small_product_##S##_body(int variant, const T *x, ptrdiff_t m,    \
                                               ptrdiff_t d, const T *mat, T *out)       \
    {                                                                                   \
        (void)variant;                                                                  \
        for (ptrdiff_t r = 0; r < m; r++) {                                             \
            const T *row = x + r * d;                                                   \
            T *o = out + r * d;                                                         \
            ptrdiff_t c0 = 0;                                                           \
            for (; c0 + TQ_SMALL_PRODUCT_WIDTH <= d; c0 += TQ_SMALL_PRODUCT_WIDTH)      \
                tq_small_product_##S##_columns(row, d, mat, c0, o);                     \
            if (c0 == d)                                                                \
                continue;                                                               \
            for (ptrdiff_t c = c0; c < d; c++)                                          \
                o[c] = 0;                                                               \
            for (ptrdiff_t i = 0; i < d; i++) {                                         \
                const T a = row[i];                                                     \
                const T *mrow = mat + i * d;                                            \
                for (ptrdiff_t c = c0; c < d; c++)                                      \
                    o[c] += a * mrow[c];                                                \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    TQ_DEFINE_VARIANTS(tq_small_product_##S,                                            \
                       (int variant, const T *x, ptrdiff_t m, ptrdiff_t d, const T *mat, \
                        T *out),                                                        \
                       (variant, x, m, d, mat, out))

TQ_DEFINE_SMALL_PRODUCT(float, f)
TQ_DEFINE_SMALL_PRODUCT(double, d)

#endif /* TQ_MATRIX_H */
