/* Float32 scoring and weighted sums straight from block-scaled codes of 1 to 4 bits.
 *
 * A block-scaled row holds, beside its `bits`-bit indices (packed as in
 * tq_lut.h), one 4-bit factor index per block of TQ_BLOCK_SIZE coordinates
 * (packed the same way, `block_bytes` per row): coordinate j of row i is
 *   scales[i] * factors[k(i, j / TQ_BLOCK_SIZE)] * centroids[idx(i, j)].
 *
 *   tq_block_scores:       out[q, i] (+)= scales[i] * sum_b f[k(i, b)] * sum_(j in b) queries[q, j] * c[idx(i, j)]
 *   tq_block_weighted_sum: acc[q, j] +=  sum_i (float)(weights[q, i] * scales[i]) * f[k(i, j / 16)] * c[idx(i, j)]
 *
 * A block of 16 coordinates is two of tq_lut.h's 8-coordinate groups, so the
 * x86 path decodes exactly as tq_lut.h's AVX2 path does and multiplies each
 * block's products (scores) or weights (sums) by its factor. A block is one
 * register of tq_lut.h's AVX-512 path, which multiplies each decoded block by
 * its factor (tq_lut_scale_pair). Sums run in float32 in a fixed order per row and
 * chunks are whole rows, so results do not depend on the caller's thread count.
 */
#ifndef TQ_BLOCK_H
#define TQ_BLOCK_H

#include "tq_lut.h"

#define TQ_BLOCK_SIZE 16
#define TQ_BLOCK_BITS 4


/* ------------------------------------------------------------------------ */
/* Portable path                                                             */
/* ------------------------------------------------------------------------ */

static void tq_block_scores_portable(const uint8_t *codes, const uint8_t *block_codes, ptrdiff_t n,
                                     ptrdiff_t row_bytes, ptrdiff_t block_bytes, int bits,
                                     const float *centroids, const float *factors, const float *queries,
                                     ptrdiff_t m, ptrdiff_t d, const double *scales, float *out,
                                     ptrdiff_t out_stride, int accumulate, float *high)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint8_t *row = codes + i * row_bytes, *block_row = block_codes + i * block_bytes;
        for (ptrdiff_t q = 0; q < m; q++) {
            const float *query = queries + q * d;
            float acc = 0.0f;
            for (ptrdiff_t start = 0; start < d; start += TQ_BLOCK_SIZE) {
                const ptrdiff_t stop = start + TQ_BLOCK_SIZE < d ? start + TQ_BLOCK_SIZE : d;
                float part = 0.0f;
                for (ptrdiff_t j = start; j < stop; j++)
                    part += query[j] * centroids[tq_lut_index(row, j, bits, row_bytes)];
                acc += tq_block_factor(block_row, start / TQ_BLOCK_SIZE, factors) * part;
            }
            float value = (float)(scales[i] * (double)acc);
            float *dst = out + q * out_stride + i;
            *dst = accumulate ? *dst + value : value;
            if (high != NULL && *dst > high[q])
                high[q] = *dst;
        }
    }
}

static void tq_block_weighted_sum_portable(const uint8_t *codes, const uint8_t *block_codes, ptrdiff_t n,
                                           ptrdiff_t row_bytes, ptrdiff_t block_bytes, int bits,
                                           const float *centroids, const float *factors,
                                           const float *weights, ptrdiff_t d, float *acc)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint8_t *row = codes + i * row_bytes, *block_row = block_codes + i * block_bytes;
        for (ptrdiff_t j = 0; j < d; j++)
            acc[j] += weights[i] * tq_block_factor(block_row, j / TQ_BLOCK_SIZE, factors)
                      * centroids[tq_lut_index(row, j, bits, row_bytes)];
    }
}

/* ------------------------------------------------------------------------ */
/* AVX2 + FMA path                                                           */
/* ------------------------------------------------------------------------ */

#ifdef TQ_LUT_X86

TQ_LUT_AVX2_INLINE void tq_block_scores_avx2_impl(const uint8_t *codes, const uint8_t *block_codes,
                                                  ptrdiff_t n, ptrdiff_t row_bytes, ptrdiff_t block_bytes,
                                                  const int bits, const float *centroids, const float *factors,
                                                  const float *queries, const int m, ptrdiff_t d,
                                                  const double *scales, float *out, ptrdiff_t out_stride,
                                                  int accumulate, float *high)
{
    const tq_lut_decoder dec = tq_lut_decoder_make(centroids, bits);
    const ptrdiff_t blocks = d / TQ_BLOCK_SIZE;
    const ptrdiff_t fast_groups = row_bytes >= 4 ? (row_bytes - 4) / bits + 1 : 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint8_t *row = codes + i * row_bytes, *block_row = block_codes + i * block_bytes;
        __m256 even[TQ_LUT_MAX_QUERIES], odd[TQ_LUT_MAX_QUERIES];
        for (int q = 0; q < m; q++)
            even[q] = odd[q] = _mm256_setzero_ps();
        /* Block b's products, times its factor, into the even or odd accumulator. */
        for (ptrdiff_t b = 0; b < blocks; b++) {
            const __m256 a = tq_lut_decode(&dec, tq_lut_group_word(row, 2 * b, bits, fast_groups), bits);
            const __m256 c = tq_lut_decode(&dec, tq_lut_group_word(row, 2 * b + 1, bits, fast_groups), bits);
            const __m256 f = _mm256_set1_ps(tq_block_factor(block_row, b, factors));
            for (int q = 0; q < m; q++) {
                const float *query = queries + q * d + TQ_BLOCK_SIZE * b;
                __m256 part = _mm256_fmadd_ps(c, _mm256_loadu_ps(query + 8),
                                              _mm256_mul_ps(a, _mm256_loadu_ps(query)));
                if (b & 1)
                    odd[q] = _mm256_fmadd_ps(f, part, odd[q]);
                else
                    even[q] = _mm256_fmadd_ps(f, part, even[q]);
            }
        }
        for (int q = 0; q < m; q++) {
            float acc = tq_lut_hsum(_mm256_add_ps(even[q], odd[q]));
            if (TQ_BLOCK_SIZE * blocks < d) {
                float part = 0.0f;
                for (ptrdiff_t j = TQ_BLOCK_SIZE * blocks; j < d; j++)
                    part += queries[q * d + j] * centroids[tq_lut_index(row, j, bits, row_bytes)];
                acc += tq_block_factor(block_row, blocks, factors) * part;
            }
            float value = (float)(scales[i] * (double)acc);
            float *dst = out + q * out_stride + i;
            *dst = accumulate ? *dst + value : value;
            if (high != NULL && *dst > high[q])
                high[q] = *dst;
        }
    }
}

TQ_LUT_AVX2_INLINE void tq_block_scores_avx2_bits(const uint8_t *codes, const uint8_t *block_codes,
                                                  ptrdiff_t n, ptrdiff_t row_bytes, ptrdiff_t block_bytes,
                                                  const int bits, const float *centroids, const float *factors,
                                                  const float *queries, ptrdiff_t m, ptrdiff_t d,
                                                  const double *scales, float *out, ptrdiff_t out_stride,
                                                  int accumulate, float *high)
{
#define TQ_BLOCK_SCORES_FOR(K) tq_block_scores_avx2_impl(codes, block_codes, n, row_bytes, block_bytes, bits, centroids, factors, queries, K, d, scales, out, out_stride, accumulate, high)
    TQ_LUT_DISPATCH4(m, TQ_BLOCK_SCORES_FOR)
#undef TQ_BLOCK_SCORES_FOR
}

TQ_LUT_AVX2_FN static void tq_block_scores_avx2(const uint8_t *codes, const uint8_t *block_codes, ptrdiff_t n,
                                                ptrdiff_t row_bytes, ptrdiff_t block_bytes, int bits,
                                                const float *centroids, const float *factors,
                                                const float *queries, ptrdiff_t m, ptrdiff_t d,
                                                const double *scales, float *out, ptrdiff_t out_stride,
                                                int accumulate, float *high)
{
#define TQ_BLOCK_SCORES_BITS(K) tq_block_scores_avx2_bits(codes, block_codes, n, row_bytes, block_bytes, K, centroids, factors, queries, m, d, scales, out, out_stride, accumulate, high)
    TQ_LUT_DISPATCH4(bits, TQ_BLOCK_SCORES_BITS)
#undef TQ_BLOCK_SCORES_BITS
}

/* Blocks b0 .. b0 + 3 (64 coordinates) accumulated over all rows, the
 * accumulators in registers. */
TQ_LUT_AVX2_INLINE void tq_block_weighted4(const tq_lut_decoder *dec, const uint8_t *codes,
                                           const uint8_t *block_codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                           ptrdiff_t block_bytes, const int bits, const float *factors,
                                           const float *weights, ptrdiff_t b0, ptrdiff_t fast_groups,
                                           float *acc)
{
    __m256 a[8];
    for (int k = 0; k < 8; k++)
        a[k] = _mm256_loadu_ps(acc + TQ_BLOCK_SIZE * b0 + 8 * k);
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint8_t *row = codes + i * row_bytes, *block_row = block_codes + i * block_bytes;
        for (int k = 0; k < 4; k++) {
            const __m256 w = _mm256_set1_ps(weights[i] * tq_block_factor(block_row, b0 + k, factors));
            const ptrdiff_t g = 2 * (b0 + k);
            a[2 * k] = _mm256_fmadd_ps(tq_lut_decode(dec, tq_lut_group_word(row, g, bits, fast_groups), bits),
                                       w, a[2 * k]);
            a[2 * k + 1] = _mm256_fmadd_ps(
                tq_lut_decode(dec, tq_lut_group_word(row, g + 1, bits, fast_groups), bits), w, a[2 * k + 1]);
        }
    }
    for (int k = 0; k < 8; k++)
        _mm256_storeu_ps(acc + TQ_BLOCK_SIZE * b0 + 8 * k, a[k]);
}

TQ_LUT_AVX2_INLINE void tq_block_weighted_sum_avx2_bits(const uint8_t *codes, const uint8_t *block_codes,
                                                        ptrdiff_t n, ptrdiff_t row_bytes, ptrdiff_t block_bytes,
                                                        const int bits, const float *centroids,
                                                        const float *factors, const float *weights,
                                                        ptrdiff_t d, float *acc)
{
    const tq_lut_decoder dec = tq_lut_decoder_make(centroids, bits);
    const ptrdiff_t blocks = d / TQ_BLOCK_SIZE;
    const ptrdiff_t fast_groups = row_bytes >= 4 ? (row_bytes - 4) / bits + 1 : 0;
    ptrdiff_t b0 = 0;
    for (; b0 + 4 <= blocks; b0 += 4)
        tq_block_weighted4(&dec, codes, block_codes, n, row_bytes, block_bytes, bits, factors, weights, b0,
                           fast_groups, acc);
    for (ptrdiff_t b = b0; b < blocks; b++) {
        __m256 lo = _mm256_loadu_ps(acc + TQ_BLOCK_SIZE * b), hi = _mm256_loadu_ps(acc + TQ_BLOCK_SIZE * b + 8);
        for (ptrdiff_t i = 0; i < n; i++) {
            const uint8_t *row = codes + i * row_bytes;
            const __m256 w = _mm256_set1_ps(weights[i] * tq_block_factor(block_codes + i * block_bytes, b, factors));
            lo = _mm256_fmadd_ps(tq_lut_decode(&dec, tq_lut_group_word(row, 2 * b, bits, fast_groups), bits), w, lo);
            hi = _mm256_fmadd_ps(tq_lut_decode(&dec, tq_lut_group_word(row, 2 * b + 1, bits, fast_groups), bits),
                                 w, hi);
        }
        _mm256_storeu_ps(acc + TQ_BLOCK_SIZE * b, lo);
        _mm256_storeu_ps(acc + TQ_BLOCK_SIZE * b + 8, hi);
    }
    for (ptrdiff_t i = 0; i < n && TQ_BLOCK_SIZE * blocks < d; i++) {
        const uint8_t *row = codes + i * row_bytes;
        const float w = weights[i] * tq_block_factor(block_codes + i * block_bytes, blocks, factors);
        for (ptrdiff_t j = TQ_BLOCK_SIZE * blocks; j < d; j++)
            acc[j] += w * centroids[tq_lut_index(row, j, bits, row_bytes)];
    }
}

TQ_LUT_AVX2_FN static void tq_block_weighted_sum_avx2(const uint8_t *codes, const uint8_t *block_codes,
                                                      ptrdiff_t n, ptrdiff_t row_bytes, ptrdiff_t block_bytes,
                                                      int bits, const float *centroids, const float *factors,
                                                      const float *weights, ptrdiff_t d, float *acc)
{
#define TQ_BLOCK_SUM_BITS(K) tq_block_weighted_sum_avx2_bits(codes, block_codes, n, row_bytes, block_bytes, K, centroids, factors, weights, d, acc)
    TQ_LUT_DISPATCH4(bits, TQ_BLOCK_SUM_BITS)
#undef TQ_BLOCK_SUM_BITS
}

TQ_LUT_AVX512_FN static int tq_block_scores_avx512(const uint8_t *codes, const uint8_t *block_codes, ptrdiff_t n,
                                            ptrdiff_t row_bytes, ptrdiff_t block_bytes, int bits,
                                            const float *centroids, const float *factors,
                                            const float *queries, ptrdiff_t m, ptrdiff_t d,
                                            const double *scales, float *out, ptrdiff_t out_stride,
                                            int accumulate, float *high)
{
    int status = 0;
#define TQ_BLOCK_SCORES512_BITS(K) status = tq_lut_scores_avx512_bits(codes, n, row_bytes, K, centroids, queries, m, d, scales, out, out_stride, accumulate, high, block_codes, block_bytes, factors)
    TQ_LUT_DISPATCH4(bits, TQ_BLOCK_SCORES512_BITS)
#undef TQ_BLOCK_SCORES512_BITS
    return status;
}

TQ_LUT_AVX512_FN static void tq_block_weighted_sum_avx512(const uint8_t *codes, const uint8_t *block_codes,
                                                   ptrdiff_t n, ptrdiff_t row_bytes, ptrdiff_t block_bytes,
                                                   int bits, const float *centroids, const float *factors,
                                                   const float *weights, ptrdiff_t m, ptrdiff_t d, float *acc)
{
#define TQ_BLOCK_SUM512_BITS(K) tq_lut_weighted_sum_avx512_bits(codes, n, row_bytes, K, centroids, weights, m, d, acc, block_codes, block_bytes, factors)
    TQ_LUT_DISPATCH4(bits, TQ_BLOCK_SUM512_BITS)
#undef TQ_BLOCK_SUM512_BITS
}

#endif /* TQ_LUT_X86 */

/* ------------------------------------------------------------------------ */
/* Entry points                                                              */
/* ------------------------------------------------------------------------ */

/* tq_lut_scores for block-scaled rows (block_codes: n rows of block_bytes). */
static inline void tq_block_scores(int variant, const uint8_t *codes, const uint8_t *block_codes, ptrdiff_t n,
                                   ptrdiff_t row_bytes, ptrdiff_t block_bytes, int bits,
                                   const float *centroids, const float *factors, const float *queries,
                                   ptrdiff_t m, ptrdiff_t d, const double *scales, float *out,
                                   ptrdiff_t out_stride, int accumulate, float *high)
{
    float top[TQ_LUT_MAX_QUERIES];
    float *local = high != NULL ? top : NULL;
    if (high != NULL)
        memcpy(top, high, sizeof(float) * (size_t)m);
#ifdef TQ_LUT_X86
    if (variant == TQ_AVX512 && tq_block_scores_avx512(codes, block_codes, n, row_bytes, block_bytes, bits,
                                                       centroids, factors, queries, m, d, scales, out,
                                                       out_stride, accumulate, local) == 0) {
        /* done */
    } else if (variant == TQ_AVX2 || variant == TQ_AVX512)
        tq_block_scores_avx2(codes, block_codes, n, row_bytes, block_bytes, bits, centroids, factors, queries,
                             m, d, scales, out, out_stride, accumulate, local);
    else
#endif
        tq_block_scores_portable(codes, block_codes, n, row_bytes, block_bytes, bits, centroids, factors,
                                 queries, m, d, scales, out, out_stride, accumulate, local);
    if (high != NULL)
        memcpy(high, top, sizeof(float) * (size_t)m);
}

/* tq_lut_weighted_sum for block-scaled rows. */
static inline void tq_block_weighted_sum(int variant, const uint8_t *codes, const uint8_t *block_codes,
                                         ptrdiff_t n, ptrdiff_t row_bytes, ptrdiff_t block_bytes, int bits,
                                         const float *centroids, const float *factors, const float *weights,
                                         ptrdiff_t weight_stride, ptrdiff_t m, const double *scales,
                                         ptrdiff_t d, float *acc)
{
    float row_weights[TQ_LUT_MAX_QUERIES * TQ_LUT_WEIGHT_ROWS];
    for (ptrdiff_t i0 = 0; i0 < n; i0 += TQ_LUT_WEIGHT_ROWS) {
        const ptrdiff_t rows = n - i0 < TQ_LUT_WEIGHT_ROWS ? n - i0 : TQ_LUT_WEIGHT_ROWS;
        const uint8_t *block = codes + i0 * row_bytes, *block_rows = block_codes + i0 * block_bytes;
        for (ptrdiff_t q = 0; q < m; q++)
            for (ptrdiff_t i = 0; i < rows; i++)
                row_weights[q * TQ_LUT_WEIGHT_ROWS + i] =
                    (float)((double)weights[q * weight_stride + i0 + i] * scales[i0 + i]);
#ifdef TQ_LUT_X86
        if (variant == TQ_AVX512) {
            tq_block_weighted_sum_avx512(block, block_rows, rows, row_bytes, block_bytes, bits, centroids,
                                         factors, row_weights, m, d, acc);
            continue;
        }
#endif
        for (ptrdiff_t q = 0; q < m; q++) {
#ifdef TQ_LUT_X86
            if (variant == TQ_AVX2) {
                tq_block_weighted_sum_avx2(block, block_rows, rows, row_bytes, block_bytes, bits, centroids,
                                           factors, row_weights + q * TQ_LUT_WEIGHT_ROWS, d, acc + q * d);
                continue;
            }
#endif
            tq_block_weighted_sum_portable(block, block_rows, rows, row_bytes, block_bytes, bits, centroids,
                                           factors, row_weights + q * TQ_LUT_WEIGHT_ROWS, d, acc + q * d);
        }
    }
}

#endif /* TQ_BLOCK_H */
