/* Float32 scoring and weighted sums straight from packed codes of 1 to 8 bits.
 *
 * A code row holds `d` indices of `bits` bits as a little-endian bit stream,
 * so eight consecutive indices fill exactly `bits` bytes (a "group"). With at
 * most 16 centroids the whole codebook fits in two 8-float registers: the x86
 * path broadcasts a group's 32-bit word, shifts lane k right by k*bits and
 * looks the centroids up with a lane permute (a blend on the index's top bit
 * for 4 bits), so eight coordinates are decoded with a handful of
 * instructions and no table in memory. Wider codes (5 to 8 bits, "wide") are
 * unpacked into one index per lane with shifts (and, on AVX-512, a byte
 * shuffle) and looked up with two-register permutes (5 and 6 bits on AVX-512)
 * or a gather from the codebook in memory. Coordinates past the last whole
 * group are done one by one.
 *
 *   tq_lut_scores:       out[q, i] (+)= scales[i] * sum_j queries[q, j] * c[idx(i, j)]
 *   tq_lut_weighted_sum: acc[q, j] +=  sum_i (float)(weights[q, i] * scales[i]) * c[idx(i, j)]
 *
 * Both accumulate in float32 in a fixed order: a given build on a given
 * machine returns the same bits for the same inputs whatever the thread count
 * or chunking of the caller (chunks are whole rows). The AVX2+FMA path and the
 * AVX-512 and portable paths round differently (FMA, partial sums); the
 * caller picks one with a kernel variant of tq_tile.h, like every kernel (the
 * AVX2 variant implies FMA there, so nothing here probes the CPU).
 */
#ifndef TQ_LUT_H
#define TQ_LUT_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tq_tile.h"

/* CALL(k) with the literal k equal to `value` (1, 2, 3, or 4 for anything
 * else), so that an always_inline body is specialised for each k. */
#define TQ_LUT_DISPATCH4(value, CALL)                                             \
    switch (value) {                                                              \
    case 1: CALL(1); break;                                                       \
    case 2: CALL(2); break;                                                       \
    case 3: CALL(3); break;                                                       \
    default: CALL(4); break;                                                      \
    }

/* CALL(k) with the literal k equal to `value` (1 .. 7, or 8 for anything else). */
#define TQ_LUT_DISPATCH8(value, CALL)                                             \
    switch (value) {                                                              \
    case 1: CALL(1); break;                                                       \
    case 2: CALL(2); break;                                                       \
    case 3: CALL(3); break;                                                       \
    case 4: CALL(4); break;                                                       \
    case 5: CALL(5); break;                                                       \
    case 6: CALL(6); break;                                                       \
    case 7: CALL(7); break;                                                       \
    default: CALL(8); break;                                                      \
    }

#define TQ_LUT_MAX_BITS 8
/* Widths decoded with an in-register codebook of at most 16 entries. */
#define TQ_LUT_NARROW_BITS 4
/* Queries scored or summed together per pass over the codes (the decode is shared). */
#define TQ_LUT_MAX_QUERIES 4
/* Rows per block of the weighted sums, whose weights are scaled first (per query). */
#define TQ_LUT_WEIGHT_ROWS 256


/* Index j of a packed row (the bytes past the row's end are never read). */
static inline uint32_t tq_lut_index(const uint8_t *row, ptrdiff_t j, int bits, ptrdiff_t row_bytes)
{
    ptrdiff_t bit = j * bits, byte = bit >> 3;
    int shift = (int)(bit & 7);
    uint32_t word = row[byte];
    if (shift + bits > 8 && byte + 1 < row_bytes)
        word |= (uint32_t)row[byte + 1] << 8;
    return (word >> shift) & ((1u << bits) - 1u);
}

/* The first `count` (<= 8) bytes at p as a little-endian integer: the last
 * groups of a row, where a full-width load would read past the row. */
static inline uint64_t tq_lut_short_word(const uint8_t *p, int count)
{
    uint64_t word = 0;
    for (int r = 0; r < count; r++)
        word |= (uint64_t)p[r] << (8 * r);
    return word;
}

/* The factor of block b (16 coordinates) of a row of 4-bit factor indices
 * (block-scaled codes, tq_block.h). */
static inline float tq_block_factor(const uint8_t *block_row, ptrdiff_t b, const float *factors)
{
    return factors[(block_row[b >> 1] >> (4 * (b & 1))) & 15u];
}

/* ------------------------------------------------------------------------ */
/* Portable path                                                             */
/* ------------------------------------------------------------------------ */

static void tq_lut_scores_portable(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes, int bits,
                                   const float *centroids, const float *queries, ptrdiff_t m,
                                   ptrdiff_t d, const double *scales, float *out,
                                   ptrdiff_t out_stride, int accumulate, float *high)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint8_t *row = codes + i * row_bytes;
        for (ptrdiff_t q = 0; q < m; q++) {
            const float *query = queries + q * d;
            float acc = 0.0f;
            for (ptrdiff_t j = 0; j < d; j++)
                acc += query[j] * centroids[tq_lut_index(row, j, bits, row_bytes)];
            float value = (float)(scales[i] * (double)acc);
            float *dst = out + q * out_stride + i;
            *dst = accumulate ? *dst + value : value;
            if (high != NULL && *dst > high[q])
                high[q] = *dst;
        }
    }
}

static void tq_lut_weighted_sum_portable(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                         int bits, const float *centroids, const float *weights,
                                         ptrdiff_t d, float *acc)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint8_t *row = codes + i * row_bytes;
        const float w = weights[i];
        for (ptrdiff_t j = 0; j < d; j++)
            acc[j] += w * centroids[tq_lut_index(row, j, bits, row_bytes)];
    }
}

/* ------------------------------------------------------------------------ */
/* AVX2 + FMA path (GCC and clang on x86-64, chosen at run time)             */
/* ------------------------------------------------------------------------ */

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define TQ_LUT_X86 1
#include <immintrin.h>

#define TQ_LUT_AVX2_FN __attribute__((target("avx2,fma")))
#define TQ_LUT_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) static inline

/* Decoder state of one codebook: both halves of the 16 centroids and the
 * per-lane shifts; for wide codes the whole codebook in memory, gathered from. */
typedef struct {
    __m256 low, high;
    __m256i shift, top_shift, mask;
    float table[1 << TQ_LUT_MAX_BITS];
} tq_lut_decoder;

TQ_LUT_AVX2_INLINE tq_lut_decoder tq_lut_decoder_make(const float *centroids, const int bits)
{
    tq_lut_decoder dec;
    float padded[16] = {0};
    dec.mask = _mm256_set1_epi32((1 << bits) - 1);
    dec.top_shift = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
    if (bits > TQ_LUT_NARROW_BITS) {
        const int s = (4 * bits) & 7;
        memcpy(dec.table, centroids, sizeof(float) * ((size_t)1 << bits));
        dec.low = dec.high = _mm256_setzero_ps();
        dec.shift = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, s, s + bits, s + 2 * bits, s + 3 * bits);
        return dec;
    }
    memcpy(padded, centroids, sizeof(float) * ((size_t)1 << bits));
    dec.low = _mm256_loadu_ps(padded);
    dec.high = _mm256_loadu_ps(padded + 8);
    dec.shift = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
    return dec;
}

/* Centroids of the eight indices held in the low 8*bits bits of `word`
 * (a dword in every lane). */
TQ_LUT_AVX2_INLINE __m256 tq_lut_decode(const tq_lut_decoder *dec, __m256i all, const int bits)
{
    __m256i idx = _mm256_srlv_epi32(all, dec->shift);
    if (bits < 3)
        idx = _mm256_and_si256(idx, dec->mask);
    __m256 value = _mm256_permutevar8x32_ps(dec->low, idx);
    if (bits == 4) {
        /* Bit 3 of index k moved to the sign bit selects the upper half. */
        __m256i top = _mm256_sllv_epi32(all, dec->top_shift);
        value = _mm256_blendv_ps(value, _mm256_permutevar8x32_ps(dec->high, idx),
                                 _mm256_castsi256_ps(top));
    }
    return value;
}

/* The dword starting at group g in every lane; a broadcast straight from memory
 * costs no shuffle. */
TQ_LUT_AVX2_INLINE __m256i tq_lut_group_word(const uint8_t *row, ptrdiff_t g, const int bits,
                                         ptrdiff_t fast_groups)
{
    const uint8_t *p = row + g * bits;
    if (g < fast_groups)
        return _mm256_broadcastd_epi32(_mm_loadu_si32(p));
    return _mm256_set1_epi32((int)tq_lut_short_word(p, bits));
}

/* Groups whose loads (tq_lut_group_word, or both of tq_lut_decode_wide's) lie inside the row. */
TQ_LUT_AVX2_INLINE ptrdiff_t tq_lut_fast_groups(ptrdiff_t row_bytes, const int bits)
{
    const ptrdiff_t reach = 4 + (bits > TQ_LUT_NARROW_BITS ? (4 * bits) >> 3 : 0);
    return row_bytes >= reach ? (row_bytes - reach) / bits + 1 : 0;
}

/* Centroids of the eight wide (5 to 8-bit) indices of group g: the dword at
 * the group's first byte holds indices 0-3, the one (4 * bits) / 8 bytes on
 * holds indices 4-7 (from bit 4 when bits is odd); a gather looks them up. */
TQ_LUT_AVX2_INLINE __m256 tq_lut_decode_wide(const tq_lut_decoder *dec, const uint8_t *row, ptrdiff_t g,
                                         const int bits, ptrdiff_t fast_groups)
{
    const uint8_t *p = row + g * bits;
    const int second = (4 * bits) >> 3;
    __m256i words;
    if (g < fast_groups)
        words = _mm256_blend_epi32(_mm256_broadcastd_epi32(_mm_loadu_si32(p)),
                                   _mm256_broadcastd_epi32(_mm_loadu_si32(p + second)), 0xF0);
    else
        words = _mm256_blend_epi32(_mm256_set1_epi32((int)tq_lut_short_word(p, 4)),
                                   _mm256_set1_epi32((int)tq_lut_short_word(p + second, bits - second)), 0xF0);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(words, dec->shift), dec->mask);
    return _mm256_i32gather_ps(dec->table, idx, 4);
}

/* Centroids of the eight indices of group g, any width. */
TQ_LUT_AVX2_INLINE __m256 tq_lut_group_values(const tq_lut_decoder *dec, const uint8_t *row, ptrdiff_t g,
                                          const int bits, ptrdiff_t fast_groups)
{
    if (bits > TQ_LUT_NARROW_BITS)
        return tq_lut_decode_wide(dec, row, g, bits, fast_groups);
    return tq_lut_decode(dec, tq_lut_group_word(row, g, bits, fast_groups), bits);
}

TQ_LUT_AVX2_INLINE float tq_lut_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TQ_LUT_AVX2_INLINE void tq_lut_scores_avx2_impl(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                            const int bits, const float *centroids,
                                            const float *queries, const int m, ptrdiff_t d,
                                            const double *scales, float *out,
                                            ptrdiff_t out_stride, int accumulate, float *high)
{
    const tq_lut_decoder dec = tq_lut_decoder_make(centroids, bits);
    const ptrdiff_t groups = d / 8, pairs = groups / 2;
    const ptrdiff_t fast_groups = tq_lut_fast_groups(row_bytes, bits);
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint8_t *row = codes + i * row_bytes;
        __m256 even[TQ_LUT_MAX_QUERIES], odd[TQ_LUT_MAX_QUERIES];
        for (int q = 0; q < m; q++)
            even[q] = odd[q] = _mm256_setzero_ps();
        /* Two accumulators per query: the FMA chains of even and odd groups overlap. */
        for (ptrdiff_t p = 0; p < pairs; p++) {
            __m256 a = tq_lut_group_values(&dec, row, 2 * p, bits, fast_groups);
            __m256 b = tq_lut_group_values(&dec, row, 2 * p + 1, bits, fast_groups);
            for (int q = 0; q < m; q++) {
                even[q] = _mm256_fmadd_ps(a, _mm256_loadu_ps(queries + q * d + 16 * p), even[q]);
                odd[q] = _mm256_fmadd_ps(b, _mm256_loadu_ps(queries + q * d + 16 * p + 8), odd[q]);
            }
        }
        if (groups & 1) {
            __m256 a = tq_lut_group_values(&dec, row, groups - 1, bits, fast_groups);
            for (int q = 0; q < m; q++)
                even[q] = _mm256_fmadd_ps(a, _mm256_loadu_ps(queries + q * d + 8 * (groups - 1)), even[q]);
        }
        for (int q = 0; q < m; q++) {
            float acc = tq_lut_hsum(_mm256_add_ps(even[q], odd[q]));
            for (ptrdiff_t j = 8 * groups; j < d; j++)
                acc += queries[q * d + j] * centroids[tq_lut_index(row, j, bits, row_bytes)];
            float value = (float)(scales[i] * (double)acc);
            float *dst = out + q * out_stride + i;
            *dst = accumulate ? *dst + value : value;
            if (high != NULL && *dst > high[q])
                high[q] = *dst;
        }
    }
}

/* Specialized on the number of queries so the accumulators stay in registers. */
TQ_LUT_AVX2_INLINE void tq_lut_scores_avx2_bits(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                            const int bits, const float *centroids,
                                            const float *queries, ptrdiff_t m, ptrdiff_t d,
                                            const double *scales, float *out,
                                            ptrdiff_t out_stride, int accumulate, float *high)
{
#define TQ_AVX2_SCORES_FOR(K) tq_lut_scores_avx2_impl(codes, n, row_bytes, bits, centroids, queries, K, d, scales, out, out_stride, accumulate, high)
    TQ_LUT_DISPATCH4(m, TQ_AVX2_SCORES_FOR)
#undef TQ_AVX2_SCORES_FOR
}

TQ_LUT_AVX2_FN static void tq_lut_scores_avx2(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                       int bits, const float *centroids, const float *queries,
                                       ptrdiff_t m, ptrdiff_t d, const double *scales, float *out,
                                       ptrdiff_t out_stride, int accumulate, float *high)
{
#define TQ_AVX2_SCORES_BITS(K) tq_lut_scores_avx2_bits(codes, n, row_bytes, K, centroids, queries, m, d, scales, out, out_stride, accumulate, high)
    TQ_LUT_DISPATCH8(bits, TQ_AVX2_SCORES_BITS)
#undef TQ_AVX2_SCORES_BITS
}

/* Eight groups (64 coordinates) starting at group g0, accumulated over all
 * rows with the accumulators in registers. */
TQ_LUT_AVX2_INLINE void tq_lut_weighted_block8(const tq_lut_decoder *dec, const uint8_t *codes,
                                           ptrdiff_t n, ptrdiff_t row_bytes, const int bits,
                                           const float *weights, ptrdiff_t g0, ptrdiff_t fast_groups, float *acc)
{
    __m256 a[8];
    for (int k = 0; k < 8; k++)
        a[k] = _mm256_loadu_ps(acc + 8 * (g0 + k));
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint8_t *row = codes + i * row_bytes;
        const __m256 w = _mm256_broadcast_ss(weights + i);
        for (int k = 0; k < 8; k++)
            a[k] = _mm256_fmadd_ps(tq_lut_group_values(dec, row, g0 + k, bits, fast_groups), w, a[k]);
    }
    for (int k = 0; k < 8; k++)
        _mm256_storeu_ps(acc + 8 * (g0 + k), a[k]);
}

TQ_LUT_AVX2_INLINE void tq_lut_weighted_sum_avx2_bits(const uint8_t *codes, ptrdiff_t n,
                                                  ptrdiff_t row_bytes, const int bits,
                                                  const float *centroids, const float *weights,
                                                  ptrdiff_t d, float *acc)
{
    const tq_lut_decoder dec = tq_lut_decoder_make(centroids, bits);
    const ptrdiff_t groups = d / 8;
    const ptrdiff_t fast_groups = tq_lut_fast_groups(row_bytes, bits);
    ptrdiff_t g0 = 0;
    for (; g0 + 8 <= groups; g0 += 8)
        tq_lut_weighted_block8(&dec, codes, n, row_bytes, bits, weights, g0, fast_groups, acc);
    for (ptrdiff_t g = g0; g < groups; g++) {
        __m256 a = _mm256_loadu_ps(acc + 8 * g);
        for (ptrdiff_t i = 0; i < n; i++) {
            const __m256 w = _mm256_broadcast_ss(weights + i);
            a = _mm256_fmadd_ps(tq_lut_group_values(&dec, codes + i * row_bytes, g, bits, fast_groups), w, a);
        }
        _mm256_storeu_ps(acc + 8 * g, a);
    }
    for (ptrdiff_t i = 0; i < n && 8 * groups < d; i++) {
        const uint8_t *row = codes + i * row_bytes;
        const float w = weights[i];
        for (ptrdiff_t j = 8 * groups; j < d; j++)
            acc[j] += w * centroids[tq_lut_index(row, j, bits, row_bytes)];
    }
}

TQ_LUT_AVX2_FN static void tq_lut_weighted_sum_avx2(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                             int bits, const float *centroids, const float *weights,
                                             ptrdiff_t d, float *acc)
{
#define TQ_AVX2_SUM_BITS(K) tq_lut_weighted_sum_avx2_bits(codes, n, row_bytes, K, centroids, weights, d, acc)
    TQ_LUT_DISPATCH8(bits, TQ_AVX2_SUM_BITS)
#undef TQ_AVX2_SUM_BITS
}

/* AVX-512: sixteen coordinates per register and the whole 16-entry codebook
 * in one, so a lookup is a single permute. Sixteen indices span 2*bits bytes,
 * brought into every lane with broadcasts straight from memory:
 *   1, 2 bits: one dword; lane k is coordinate k;
 *   3 bits:    the dword at the block's first byte for lanes 0-7 and the one
 *              3 bytes further for lanes 8-15; lane k is coordinate k;
 *   4 bits:    one qword; lane 2k is coordinate k and lane 2k+1 coordinate
 *              8 + k ("interleaved": queries and sums are permuted to match);
 *   5-7 bits:  the block's 16 bytes in every 128-bit lane; a byte shuffle puts
 *              the two bytes holding index k into lane k, a shift and a mask
 *              finish it; lane k is coordinate k;
 *   8 bits:    one byte per lane, zero-extended.
 * Wide indices are looked up in two (5 bits) or four (6 bits) registers with
 * two-register permutes, or gathered from the codebook in memory (7, 8 bits). */
#ifndef TQ_LUT_PERMUTE_BITS
#define TQ_LUT_PERMUTE_BITS 7   /* wider codes are gathered */
#endif
#define TQ_LUT_AVX512_FN __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define TQ_LUT_AVX512_INLINE __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"), always_inline)) static inline
#define TQ_LUT_INTERLEAVED(bits) ((bits) == 4)

typedef struct {
    __m512 table;
    __m512i shift, mask;
    ptrdiff_t fast_blocks; /* blocks whose broadcasts lie inside the row */
    __m512i pick;          /* wide: the byte shuffle */
    __m512 wide[8];        /* 5 to 7 bits: the codebook in registers */
    float lut[1 << TQ_LUT_MAX_BITS]; /* 8 bits: the codebook gathered from */
} tq_lut_decoder16;

TQ_LUT_AVX512_INLINE tq_lut_decoder16 tq_lut_decoder16_make(const float *centroids, const int bits,
                                                        ptrdiff_t row_bytes)
{
    tq_lut_decoder16 dec;
    float padded[16] = {0};
    dec.mask = _mm512_set1_epi32((1 << bits) - 1);
    if (bits > TQ_LUT_NARROW_BITS) {
        float wide[128] = {0};
        int shifts[16];
        uint8_t pick[64];
        for (int k = 0; k < 16; k++) {
            const int byte = (k * bits) >> 3;
            shifts[k] = (k * bits) & 7;
            pick[4 * k] = (uint8_t)byte;
            pick[4 * k + 1] = (uint8_t)(byte + 1 < 16 ? byte + 1 : 0x80);
            pick[4 * k + 2] = pick[4 * k + 3] = 0x80;   /* zero */
        }
        dec.table = _mm512_setzero_ps();
        dec.shift = _mm512_loadu_si512(shifts);
        dec.pick = _mm512_loadu_si512(pick);
        if (bits <= TQ_LUT_PERMUTE_BITS) {
            memcpy(wide, centroids, sizeof(float) * ((size_t)1 << bits));
            for (int k = 0; k < 8; k++)
                dec.wide[k] = _mm512_loadu_ps(wide + 16 * k);
        } else {
            memcpy(dec.lut, centroids, sizeof(float) * ((size_t)1 << bits));
        }
        dec.fast_blocks = 0;
        return dec;
    }
    memcpy(padded, centroids, sizeof(float) * ((size_t)1 << bits));
    dec.table = _mm512_loadu_ps(padded);
    if (bits == 4) {
        dec.shift = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
        dec.fast_blocks = row_bytes >= 8 ? (row_bytes - 8) / 8 + 1 : 0;
    } else if (bits == 3) {
        dec.shift = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21);
        dec.fast_blocks = row_bytes >= 7 ? (row_bytes - 7) / 6 + 1 : 0;
    } else {
        dec.shift = _mm512_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits,
                                      8 * bits, 9 * bits, 10 * bits, 11 * bits, 12 * bits, 13 * bits,
                                      14 * bits, 15 * bits);
        dec.fast_blocks = row_bytes >= 4 ? (row_bytes - 4) / (2 * bits) + 1 : 0;
    }
    return dec;
}

/* Centroids of the 16 indices packed in the low 2 * bits bytes of `raw` (the
 * lane order of tq_lut_decode16). */
TQ_LUT_AVX512_INLINE __m512 tq_lut_decode16_raw(const tq_lut_decoder16 *dec, __m128i raw, const int bits)
{
    if (bits <= TQ_LUT_NARROW_BITS) {
        __m512i words;
        if (bits == 4)
            words = _mm512_broadcastq_epi64(raw);
        else if (bits == 3)
            words = _mm512_mask_broadcastd_epi32(_mm512_broadcastd_epi32(raw), (__mmask16)0xFF00,
                                                 _mm_srli_si128(raw, 3));
        else
            words = _mm512_broadcastd_epi32(raw);
        __m512i idx = _mm512_srlv_epi32(words, dec->shift);
        if (bits < 4)
            idx = _mm512_and_si512(idx, dec->mask);
        return _mm512_permutexvar_ps(idx, dec->table);
    }
    __m512i idx;
    if (bits == 8)
        idx = _mm512_cvtepu8_epi32(raw);
    else
        idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(_mm512_broadcast_i32x4(raw), dec->pick),
                                                 dec->shift), dec->mask);
    if (bits == 5)
        return _mm512_permutex2var_ps(dec->wide[0], idx, dec->wide[1]);
    if (bits > TQ_LUT_PERMUTE_BITS)
        return _mm512_i32gather_ps(idx, dec->lut, 4);
    const __mmask16 bit5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    __m512 value = _mm512_mask_blend_ps(bit5, _mm512_permutex2var_ps(dec->wide[0], idx, dec->wide[1]),
                                        _mm512_permutex2var_ps(dec->wide[2], idx, dec->wide[3]));
    if (bits == 7) {
        const __m512 upper = _mm512_mask_blend_ps(bit5, _mm512_permutex2var_ps(dec->wide[4], idx, dec->wide[5]),
                                                  _mm512_permutex2var_ps(dec->wide[6], idx, dec->wide[7]));
        value = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(64)), value, upper);
    }
    return value;
}

/* Centroids of coordinates 16h .. 16h+15 of a row, in the lane order above. */
TQ_LUT_AVX512_INLINE __m512 tq_lut_decode16(const tq_lut_decoder16 *dec, const uint8_t *row, ptrdiff_t h,
                                        const int bits)
{
    if (bits > TQ_LUT_NARROW_BITS)   /* a block's 2 * bits bytes, with a masked load */
        return tq_lut_decode16_raw(dec, _mm_maskz_loadu_epi8((__mmask16)((1u << (2 * bits)) - 1u),
                                                             row + 2 * h * bits), bits);
    const uint8_t *p = row + 2 * h * bits;
    const int fast = h < dec->fast_blocks;
    __m512i words;
    if (bits == 4) {
        words = fast ? _mm512_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)p))
                     : _mm512_set1_epi64((long long)tq_lut_short_word(p, 8));
    } else if (bits == 3) {
        words = fast ? _mm512_mask_broadcastd_epi32(_mm512_broadcastd_epi32(_mm_loadu_si32(p)),
                                                    (__mmask16)0xFF00, _mm_loadu_si32(p + 3))
                     : _mm512_mask_blend_epi32((__mmask16)0xFF00,
                                               _mm512_set1_epi32((int)tq_lut_short_word(p, 3)),
                                               _mm512_set1_epi32((int)tq_lut_short_word(p + 3, 3)));
    } else {
        words = fast ? _mm512_broadcastd_epi32(_mm_loadu_si32(p))
                     : _mm512_set1_epi32((int)tq_lut_short_word(p, 2 * bits));
    }
    __m512i idx = _mm512_srlv_epi32(words, dec->shift);
    if (bits < 4)
        idx = _mm512_and_si512(idx, dec->mask);
    return _mm512_permutexvar_ps(idx, dec->table);
}

/* tq_lut_decode16 of the last, partial block h of a row of row_bytes bytes,
 * read with a masked load of the bytes left in the row (nothing past the row
 * is read); the lanes past the row's last coordinate hold centroid 0. */
TQ_LUT_AVX512_INLINE __m512 tq_lut_decode16_tail(const tq_lut_decoder16 *dec, const uint8_t *row, ptrdiff_t h,
                                             const int bits, ptrdiff_t row_bytes)
{
    const ptrdiff_t start = 2 * h * bits, left = row_bytes - start;
    const unsigned count = (unsigned)(left < 2 * bits ? left : 2 * bits);
    return tq_lut_decode16_raw(dec, _mm_maskz_loadu_epi8((__mmask16)((1u << count) - 1u), row + start), bits);
}

/* Natural coordinate order to interleaved lane order, and back. */
TQ_LUT_AVX512_INLINE __m512 tq_lut_interleave(__m512 v)
{
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15), v);
}

TQ_LUT_AVX512_INLINE __m512 tq_lut_deinterleave(__m512 v)
{
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15), v);
}

/* Centroids of coordinates 32p .. 32p+31 as two registers in "pair order".
 * With 4 bits the pair is 16 bytes, one zero-extended byte per lane: the
 * permute reads the low nibble (coordinate 32p + 2L) directly and the high one
 * (32p + 2L + 1) after a shift, so the pair order is the even coordinates,
 * then the odd ones. Otherwise it is blocks 2p and 2p+1 as tq_lut_decode16
 * gives them (coordinate order). */
TQ_LUT_AVX512_INLINE void tq_lut_decode_pair(const tq_lut_decoder16 *dec, const uint8_t *row, ptrdiff_t p,
                                         const int bits, __m512 *first, __m512 *second)
{
    if (bits == 4) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + 16 * p)));
        *first = _mm512_permutexvar_ps(bytes, dec->table);
        *second = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), dec->table);
    } else {
        *first = tq_lut_decode16(dec, row, 2 * p, bits);
        *second = tq_lut_decode16(dec, row, 2 * p + 1, bits);
    }
}

/* 32 values in coordinate order (lo: the first 16) into pair order, and back. */
TQ_LUT_AVX512_INLINE void tq_lut_to_pair_order(__m512 *lo, __m512 *hi, const int bits)
{
    if (bits == 4) {
        __m512 a = *lo, b = *hi;
        *lo = _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
        *hi = _mm512_permutex2var_ps(a, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), b);
    }
}

TQ_LUT_AVX512_INLINE void tq_lut_from_pair_order(__m512 *lo, __m512 *hi, const int bits)
{
    if (bits == 4) {
        __m512 even = *lo, odd = *hi;
        *lo = _mm512_permutex2var_ps(even, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), odd);
        *hi = _mm512_permutex2var_ps(even, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31), odd);
    }
}

/* A pair's two registers (tq_lut_decode_pair's order) times the factors of
 * blocks 2p and 2p+1 of a row of block-scaled codes (byte p of its factor
 * indices holds both): in pair order (4 bits) lanes 0-7 of both registers are
 * in block 2p and lanes 8-15 in block 2p+1; otherwise each register is one
 * block. The factors are broadcast from the table in memory. */
TQ_LUT_AVX512_INLINE void tq_lut_scale_pair(const uint8_t *scale_row, const float *factors, ptrdiff_t p,
                                        const int bits, __m512 *first, __m512 *second)
{
    const unsigned byte = scale_row[p];
    const __m512 f0 = _mm512_set1_ps(factors[byte & 15u]), f1 = _mm512_set1_ps(factors[byte >> 4]);
    if (bits == 4) {
        const __m512 f = _mm512_mask_blend_ps((__mmask16)0xFF00, f0, f1);
        *first = _mm512_mul_ps(*first, f);
        *second = _mm512_mul_ps(*second, f);
    } else {
        *first = _mm512_mul_ps(*first, f0);
        *second = _mm512_mul_ps(*second, f1);
    }
}

/* Lane t of the result is the sum of the sixteen lanes of v[t]: a transposing
 * tree of shuffles and adds that only ever adds partial sums of the same t, so
 * each lane's arithmetic does not depend on the other fifteen vectors. */
TQ_LUT_AVX512_INLINE __m512 tq_lut_sum16(const __m512 *v)
{
    __m512 halves[8], quarters[4], eighths[2];
    for (int k = 0; k < 8; k++) /* 128-bit chunks: v[2k] in 0-1, v[2k+1] in 2-3 */
        halves[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                                  _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++) /* chunk c: v[4k + c] */
        quarters[k] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * k], halves[2 * k + 1], 0x88),
                                    _mm512_shuffle_f32x4(halves[2 * k], halves[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++) /* chunk c: lanes 0-1 v[8k + c], lanes 2-3 v[8k + 4 + c] */
        eighths[k] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * k], quarters[2 * k + 1], 0x44),
                                   _mm512_shuffle_ps(quarters[2 * k], quarters[2 * k + 1], 0xEE));
    /* lane 4c + j: v[c + 4j]; put lane t back to v[t] */
    __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88),
                                _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
}

/* The products of R (1 or 2) consecutive rows with m queries in the lanes
 * of the decoder (lane_queries, `width` floats per query): sum[r * m + q] is
 * a vector whose lanes add up to row r's score over the whole blocks. Rows
 * share the query loads and their FMA chains overlap, but each row's
 * arithmetic is the same as on its own. */
TQ_LUT_AVX512_INLINE void tq_lut_row_products(const tq_lut_decoder16 *dec, const uint8_t *row,
                                          ptrdiff_t row_bytes, const int R, const int bits,
                                          const float *lane_queries, const int m, ptrdiff_t width,
                                          ptrdiff_t blocks, const uint8_t *scale_row,
                                          ptrdiff_t scale_bytes, const float *factors, __m512 *sum)
{
    const ptrdiff_t pairs = blocks / 2;
    __m512 even[2 * TQ_LUT_MAX_QUERIES], odd[2 * TQ_LUT_MAX_QUERIES];
    for (int k = 0; k < R * m; k++)
        even[k] = odd[k] = _mm512_setzero_ps();
    for (ptrdiff_t p = 0; p < pairs; p++) {
        __m512 a[2], b[2];
        for (int r = 0; r < R; r++) {
            tq_lut_decode_pair(dec, row + r * row_bytes, p, bits, &a[r], &b[r]);
            if (scale_row != NULL)
                tq_lut_scale_pair(scale_row + r * scale_bytes, factors, p, bits, &a[r], &b[r]);
        }
        for (int q = 0; q < m; q++) {
            const __m512 qa = _mm512_loadu_ps(lane_queries + q * width + 32 * p);
            const __m512 qb = _mm512_loadu_ps(lane_queries + q * width + 32 * p + 16);
            for (int r = 0; r < R; r++) {
                even[r * m + q] = _mm512_fmadd_ps(a[r], qa, even[r * m + q]);
                odd[r * m + q] = _mm512_fmadd_ps(b[r], qb, odd[r * m + q]);
            }
        }
    }
    if (blocks & 1) {
        for (int r = 0; r < R; r++) {
            __m512 a = tq_lut_decode16(dec, row + r * row_bytes, blocks - 1, bits);
            if (scale_row != NULL)
                a = _mm512_mul_ps(a, _mm512_set1_ps(tq_block_factor(scale_row + r * scale_bytes, blocks - 1, factors)));
            for (int q = 0; q < m; q++)
                even[r * m + q] = _mm512_fmadd_ps(a, _mm512_loadu_ps(lane_queries + q * width + 16 * (blocks - 1)),
                                                  even[r * m + q]);
        }
    }
    if (16 * blocks < width) {   /* the partial block; its query lanes past d are 0 */
        for (int r = 0; r < R; r++) {
            __m512 a = tq_lut_decode16_tail(dec, row + r * row_bytes, blocks, bits, row_bytes);
            if (scale_row != NULL)
                a = _mm512_mul_ps(a, _mm512_set1_ps(tq_block_factor(scale_row + r * scale_bytes, blocks, factors)));
            for (int q = 0; q < m; q++)
                odd[r * m + q] = _mm512_fmadd_ps(a, _mm512_loadu_ps(lane_queries + q * width + 16 * blocks),
                                                 odd[r * m + q]);
        }
    }
    for (int k = 0; k < R * m; k++)
        sum[k] = _mm512_add_ps(even[k], odd[k]);
}

/* Rows in blocks of 16, two at a time for one or two queries (tq_lut_row_products), then
 * tq_lut_sum16 reduces sixteen rows at once; a whole block with no
 * coordinates past the last whole 16 is scaled and stored with vector
 * instructions doing the scalar path's arithmetic. A row's score is the same
 * arithmetic wherever it sits. */
TQ_LUT_AVX512_INLINE void tq_lut_scores_avx512_impl(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                                const int bits, const float *centroids,
                                                const float *queries, const int m, ptrdiff_t d,
                                                const double *scales, float *out,
                                                ptrdiff_t out_stride, int accumulate, float *high,
                                                float *lane_queries, const uint8_t *scale_codes,
                                                ptrdiff_t scale_bytes, const float *factors)
{
    const tq_lut_decoder16 dec = tq_lut_decoder16_make(centroids, bits, row_bytes);
    const ptrdiff_t blocks = d / 16, pairs = blocks / 2, width = 16 * ((d + 15) / 16);
    __m512 partial[TQ_LUT_MAX_QUERIES][16];
    float sums[16];
    /* The queries in the decoder's lane order (m rows of `width` floats): whole
     * pairs in pair order, a last odd whole block and the partial block (zeros
     * past d) as tq_lut_decode16 has them. */
    for (int q = 0; q < m; q++) {
        const float *query = queries + q * d;
        float *lanes = lane_queries + q * width;
        for (ptrdiff_t p = 0; p < pairs; p++) {
            __m512 lo = _mm512_loadu_ps(query + 32 * p), hi = _mm512_loadu_ps(query + 32 * p + 16);
            tq_lut_to_pair_order(&lo, &hi, bits);
            _mm512_storeu_ps(lanes + 32 * p, lo);
            _mm512_storeu_ps(lanes + 32 * p + 16, hi);
        }
        if (blocks & 1) {
            __m512 v = _mm512_loadu_ps(query + 16 * (blocks - 1));
            _mm512_storeu_ps(lanes + 16 * (blocks - 1), TQ_LUT_INTERLEAVED(bits) ? tq_lut_interleave(v) : v);
        }
        if (16 * blocks < d) {
            __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << (d - 16 * blocks)) - 1u), query + 16 * blocks);
            _mm512_storeu_ps(lanes + 16 * blocks, TQ_LUT_INTERLEAVED(bits) ? tq_lut_interleave(v) : v);
        }
    }
    for (ptrdiff_t i0 = 0; i0 < n; i0 += 16) {
        const int rows = n - i0 < 16 ? (int)(n - i0) : 16;
        const uint8_t *block = codes + i0 * row_bytes;
        const uint8_t *scale_block = scale_codes != NULL ? scale_codes + i0 * scale_bytes : NULL;
#define TQ_SCALE_ROW(t) (scale_block != NULL ? scale_block + (t) * scale_bytes : NULL)
        if (rows == 16) {
            /* Two rows at a time while their accumulators fit in registers. */
            const int R = m <= 2 ? 2 : 1;
#pragma GCC unroll 16
            for (int t = 0; t < 16; t += R) {
                __m512 sum[2 * TQ_LUT_MAX_QUERIES];
                tq_lut_row_products(&dec, block + t * row_bytes, row_bytes, R, bits, lane_queries, m, width,
                                    blocks, TQ_SCALE_ROW(t), scale_bytes, factors, sum);
                for (int r = 0; r < R; r++)
                    for (int q = 0; q < m; q++)
                        partial[q][t + r] = sum[r * m + q];
            }
        } else {
            for (int t = 0; t < 16; t++) {
                __m512 sum[TQ_LUT_MAX_QUERIES];
                if (t < rows)
                    tq_lut_row_products(&dec, block + t * row_bytes, row_bytes, 1, bits, lane_queries, m, width,
                                        blocks, TQ_SCALE_ROW(t), scale_bytes, factors, sum);
                for (int q = 0; q < m; q++)
                    partial[q][t] = t < rows ? sum[q] : _mm512_setzero_ps();
            }
        }
        for (int q = 0; q < m; q++) {
            const __m512 total = tq_lut_sum16(partial[q]);
            float *dst = out + q * out_stride + i0;
            if (rows == 16) {
                const __m512d lo = _mm512_mul_pd(_mm512_loadu_pd(scales + i0),
                                                 _mm512_cvtps_pd(_mm512_castps512_ps256(total)));
                const __m512d hi = _mm512_mul_pd(_mm512_loadu_pd(scales + i0 + 8),
                                                 _mm512_cvtps_pd(_mm256_castpd_ps(
                                                     _mm512_extractf64x4_pd(_mm512_castps_pd(total), 1))));
                __m512 value = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)),
                                                  _mm512_cvtpd_ps(hi), 1);
                if (accumulate)
                    value = _mm512_add_ps(_mm512_loadu_ps(dst), value);
                _mm512_storeu_ps(dst, value);
                if (high != NULL) {
                    const float top = _mm512_reduce_max_ps(value);
                    if (top > high[q])
                        high[q] = top;
                }
                continue;
            }
            _mm512_storeu_ps(sums, total);
            for (int t = 0; t < rows; t++) {
                float value = (float)(scales[i0 + t] * (double)sums[t]);
                dst[t] = accumulate ? dst[t] + value : value;
                if (high != NULL && dst[t] > high[q])
                    high[q] = dst[t];
            }
        }
#undef TQ_SCALE_ROW
    }
}

/* Returns -1 (nothing written) when out of memory, else 0. scale_codes NULL: plain codes. */
TQ_LUT_AVX512_INLINE int tq_lut_scores_avx512_bits(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                               const int bits, const float *centroids,
                                               const float *queries, ptrdiff_t m, ptrdiff_t d,
                                               const double *scales, float *out,
                                               ptrdiff_t out_stride, int accumulate, float *high,
                                               const uint8_t *scale_codes, ptrdiff_t scale_bytes,
                                               const float *factors)
{
    float *lane_queries = (float *)malloc(sizeof(float) * (size_t)(m * 16 * ((d + 15) / 16) + 1));
    if (lane_queries == NULL)
        return -1;
#define TQ_AVX512_SCORES_FOR(K) tq_lut_scores_avx512_impl(codes, n, row_bytes, bits, centroids, queries, K, d, scales, out, out_stride, accumulate, high, lane_queries, scale_codes, scale_bytes, factors)
    TQ_LUT_DISPATCH4(m, TQ_AVX512_SCORES_FOR)
#undef TQ_AVX512_SCORES_FOR
    free(lane_queries);
    return 0;
}

TQ_LUT_AVX512_FN static void tq_lut_scores_avx512(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                           int bits, const float *centroids, const float *queries,
                                           ptrdiff_t m, ptrdiff_t d, const double *scales, float *out,
                                           ptrdiff_t out_stride, int accumulate, float *high)
{
    int status = 0;
#define TQ_AVX512_SCORES_BITS(K) status = tq_lut_scores_avx512_bits(codes, n, row_bytes, K, centroids, queries, m, d, scales, out, out_stride, accumulate, high, NULL, 0, NULL)
    TQ_LUT_DISPATCH8(bits, TQ_AVX512_SCORES_BITS)
#undef TQ_AVX512_SCORES_BITS
    if (status < 0)
        tq_lut_scores_portable(codes, n, row_bytes, bits, centroids, queries, m, d, scales, out,
                               out_stride, accumulate, high);
}

/* `count` pairs from pair p0 for m queries (m * count <= 8), the accumulators
 * in registers: each row is decoded once for all the queries. Query q's row
 * weights are weights[q * TQ_LUT_WEIGHT_ROWS + i], its sums acc[q * d + j];
 * each query's arithmetic is what it would be alone. */
TQ_LUT_AVX512_INLINE void tq_lut_weighted_pairs(const tq_lut_decoder16 *dec, const uint8_t *codes,
                                            ptrdiff_t n, ptrdiff_t row_bytes, const int bits,
                                            const float *weights, const int m, ptrdiff_t p0,
                                            const int count, ptrdiff_t d, float *acc,
                                            const uint8_t *scale_codes, ptrdiff_t scale_bytes,
                                            const float *factors)
{
    __m512 a[8][2];
    for (int q = 0; q < m; q++)
        for (int k = 0; k < count; k++) {
            float *sums = acc + q * d + 32 * (p0 + k);
            a[q * count + k][0] = _mm512_loadu_ps(sums);
            a[q * count + k][1] = _mm512_loadu_ps(sums + 16);
            tq_lut_to_pair_order(&a[q * count + k][0], &a[q * count + k][1], bits);
        }
    for (ptrdiff_t i = 0; i < n; i++) {
        const uint8_t *row = codes + i * row_bytes;
        __m512 lo[4], hi[4];
        for (int k = 0; k < count; k++) {
            tq_lut_decode_pair(dec, row, p0 + k, bits, &lo[k], &hi[k]);
            if (scale_codes != NULL)
                tq_lut_scale_pair(scale_codes + i * scale_bytes, factors, p0 + k, bits, &lo[k], &hi[k]);
        }
        for (int q = 0; q < m; q++) {
            const __m512 w = _mm512_set1_ps(weights[q * TQ_LUT_WEIGHT_ROWS + i]);
            for (int k = 0; k < count; k++) {
                a[q * count + k][0] = _mm512_fmadd_ps(lo[k], w, a[q * count + k][0]);
                a[q * count + k][1] = _mm512_fmadd_ps(hi[k], w, a[q * count + k][1]);
            }
        }
    }
    for (int q = 0; q < m; q++)
        for (int k = 0; k < count; k++) {
            float *sums = acc + q * d + 32 * (p0 + k);
            tq_lut_from_pair_order(&a[q * count + k][0], &a[q * count + k][1], bits);
            _mm512_storeu_ps(sums, a[q * count + k][0]);
            _mm512_storeu_ps(sums + 16, a[q * count + k][1]);
        }
}

TQ_LUT_AVX512_INLINE void tq_lut_weighted_sum_avx512_impl(const uint8_t *codes, ptrdiff_t n,
                                                      ptrdiff_t row_bytes, const int bits,
                                                      const float *centroids, const float *weights,
                                                      const int m, ptrdiff_t d, float *acc,
                                                      const uint8_t *scale_codes, ptrdiff_t scale_bytes,
                                                      const float *factors)
{
    const tq_lut_decoder16 dec = tq_lut_decoder16_make(centroids, bits, row_bytes);
    const ptrdiff_t blocks = d / 16, pairs = blocks / 2;
    const int count = m <= 2 ? 4 : 2;   /* at most 16 accumulators */
    ptrdiff_t p0 = 0;
    for (; p0 + count <= pairs; p0 += count)
        tq_lut_weighted_pairs(&dec, codes, n, row_bytes, bits, weights, m, p0, count, d, acc, scale_codes,
                              scale_bytes, factors);
    for (; p0 < pairs; p0++)
        tq_lut_weighted_pairs(&dec, codes, n, row_bytes, bits, weights, m, p0, 1, d, acc, scale_codes,
                              scale_bytes, factors);
    for (int q = 0; q < m; q++) {
        const float *w = weights + q * TQ_LUT_WEIGHT_ROWS;
        float *sums = acc + q * d;
        if (blocks & 1) {
            const ptrdiff_t h = blocks - 1;
            __m512 a = _mm512_loadu_ps(sums + 16 * h);
            if (TQ_LUT_INTERLEAVED(bits))
                a = tq_lut_interleave(a);
            for (ptrdiff_t i = 0; i < n; i++) {
                __m512 v = tq_lut_decode16(&dec, codes + i * row_bytes, h, bits);
                if (scale_codes != NULL)
                    v = _mm512_mul_ps(v, _mm512_set1_ps(tq_block_factor(scale_codes + i * scale_bytes, h, factors)));
                a = _mm512_fmadd_ps(v, _mm512_set1_ps(w[i]), a);
            }
            _mm512_storeu_ps(sums + 16 * h, TQ_LUT_INTERLEAVED(bits) ? tq_lut_deinterleave(a) : a);
        }
        if (16 * blocks < d) {   /* the partial block, its lanes past d never stored */
            const __mmask16 keep = (__mmask16)((1u << (d - 16 * blocks)) - 1u);
            __m512 a = _mm512_maskz_loadu_ps(keep, sums + 16 * blocks);
            if (TQ_LUT_INTERLEAVED(bits))
                a = tq_lut_interleave(a);
            for (ptrdiff_t i = 0; i < n; i++) {
                __m512 v = tq_lut_decode16_tail(&dec, codes + i * row_bytes, blocks, bits, row_bytes);
                if (scale_codes != NULL)
                    v = _mm512_mul_ps(v, _mm512_set1_ps(tq_block_factor(scale_codes + i * scale_bytes, blocks, factors)));
                a = _mm512_fmadd_ps(v, _mm512_set1_ps(w[i]), a);
            }
            _mm512_mask_storeu_ps(sums + 16 * blocks, keep, TQ_LUT_INTERLEAVED(bits) ? tq_lut_deinterleave(a) : a);
        }
    }
}

/* Specialized on the number of queries so the accumulators stay in registers. */
TQ_LUT_AVX512_INLINE void tq_lut_weighted_sum_avx512_bits(const uint8_t *codes, ptrdiff_t n,
                                                      ptrdiff_t row_bytes, const int bits,
                                                      const float *centroids, const float *weights,
                                                      ptrdiff_t m, ptrdiff_t d, float *acc,
                                                      const uint8_t *scale_codes, ptrdiff_t scale_bytes,
                                                      const float *factors)
{
#define TQ_AVX512_SUM_FOR(K) tq_lut_weighted_sum_avx512_impl(codes, n, row_bytes, bits, centroids, weights, K, d, acc, scale_codes, scale_bytes, factors)
    TQ_LUT_DISPATCH4(m, TQ_AVX512_SUM_FOR)
#undef TQ_AVX512_SUM_FOR
}

/* The m <= TQ_LUT_MAX_QUERIES queries' weights in rows of TQ_LUT_WEIGHT_ROWS. */
TQ_LUT_AVX512_FN static void tq_lut_weighted_sum_avx512(const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                                 int bits, const float *centroids, const float *weights,
                                                 ptrdiff_t m, ptrdiff_t d, float *acc)
{
#define TQ_AVX512_SUM_BITS(K) tq_lut_weighted_sum_avx512_bits(codes, n, row_bytes, K, centroids, weights, m, d, acc, NULL, 0, NULL)
    TQ_LUT_DISPATCH8(bits, TQ_AVX512_SUM_BITS)
#undef TQ_AVX512_SUM_BITS
}
#endif

/* ------------------------------------------------------------------------ */
/* Softmax numerators                                                        */
/* ------------------------------------------------------------------------ */

/* exp(x - shift) in place for x <= shift, float32. The vector paths use
 * Cephes' expf (round to the nearest power of two, a degree-6 polynomial on
 * the reduced argument; about 1 ulp), 0 below -87 (and for lanes past n);
 * the portable path calls expf. Returns the sum of the results, in double,
 * in a fixed order. */
static inline double tq_exp_sum(const float *x, ptrdiff_t n)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    ptrdiff_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += x[i];
        s1 += x[i + 1];
        s2 += x[i + 2];
        s3 += x[i + 3];
    }
    for (; i < n; i++)
        s0 += x[i];
    return (s0 + s1) + (s2 + s3);
}

static double tq_exp_shifted_portable(float *x, ptrdiff_t n, float shift)
{
    for (ptrdiff_t i = 0; i < n; i++)
        x[i] = expf(x[i] - shift);
    return tq_exp_sum(x, n);
}

#ifdef TQ_LUT_X86
#define TQ_EXPF_LOG2E 1.44269504088896341f
#define TQ_EXPF_C1 0.693359375f
#define TQ_EXPF_C2 -2.12194440e-4f

TQ_LUT_AVX512_FN static double tq_exp_shifted_avx512(float *x, ptrdiff_t n, float shift)
{
    const __m512 low = _mm512_set1_ps(-87.0f), offset = _mm512_set1_ps(shift);
    __m512d sum_low = _mm512_setzero_pd(), sum_high = _mm512_setzero_pd();
    for (ptrdiff_t i = 0; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + i), offset);
        const __m512 c = _mm512_max_ps(v, low);
        const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(TQ_EXPF_LOG2E)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(TQ_EXPF_C1), c);
        r = _mm512_fnmadd_ps(k, _mm512_set1_ps(TQ_EXPF_C2), r);
        __m512 p = _mm512_set1_ps(1.9875691500e-4f);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
        p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
        __m512 e = _mm512_scalef_ps(p, k);
        e = _mm512_maskz_mov_ps(live & _mm512_cmp_ps_mask(v, low, _CMP_NLT_UQ), e);
        _mm512_mask_storeu_ps(x + i, live, e);
        sum_low = _mm512_add_pd(sum_low, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        sum_high = _mm512_add_pd(sum_high, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(sum_low, sum_high));
}

TQ_LUT_AVX2_FN static double tq_exp_shifted_avx2(float *x, ptrdiff_t n, float shift)
{
    const __m256 low = _mm256_set1_ps(-87.0f), offset = _mm256_set1_ps(shift);
    __m256d sum_low = _mm256_setzero_pd(), sum_high = _mm256_setzero_pd();
    for (ptrdiff_t i = 0; i < n; i += 8) {
        const int left = n - i >= 8 ? 8 : (int)(n - i);
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(left),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 v = _mm256_sub_ps(_mm256_maskload_ps(x + i, live), offset);
        const __m256 c = _mm256_max_ps(v, low);
        const __m256 k = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(TQ_EXPF_LOG2E)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(TQ_EXPF_C1), c);
        r = _mm256_fnmadd_ps(k, _mm256_set1_ps(TQ_EXPF_C2), r);
        __m256 p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
        const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
        __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
        e = _mm256_and_ps(e, _mm256_and_ps(_mm256_castsi256_ps(live), _mm256_cmp_ps(v, low, _CMP_NLT_UQ)));
        _mm256_maskstore_ps(x + i, live, e);
        sum_low = _mm256_add_pd(sum_low, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        sum_high = _mm256_add_pd(sum_high, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    sum_low = _mm256_add_pd(sum_low, sum_high);
    __m128d half = _mm_add_pd(_mm256_castpd256_pd128(sum_low), _mm256_extractf128_pd(sum_low, 1));
    return _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
}
#endif

/* x[i] = exp(x[i] - shift) for x[i] <= shift; returns the sum of the results
 * (in double, in a fixed order). */
static inline double tq_exp_shifted(int variant, float *x, ptrdiff_t n, float shift)
{
#ifdef TQ_LUT_X86
    switch (variant) {
    case TQ_AVX512: return tq_exp_shifted_avx512(x, n, shift);
    case TQ_AVX2: return tq_exp_shifted_avx2(x, n, shift);
    }
#endif
    return tq_exp_shifted_portable(x, n, shift);
}

/* ------------------------------------------------------------------------ */
/* Entry points                                                              */
/* ------------------------------------------------------------------------ */

/* Scores of rows 0..n-1 for m <= TQ_LUT_MAX_QUERIES queries (rows of `queries`,
 * d floats each); out[q * out_stride + i]. bits in 1..TQ_LUT_MAX_BITS. When
 * `high` is not NULL, high[q] is raised to the largest score written for q. */
static inline void tq_lut_scores(int variant, const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes, int bits,
                                 const float *centroids, const float *queries, ptrdiff_t m,
                                 ptrdiff_t d, const double *scales, float *out,
                                 ptrdiff_t out_stride, int accumulate, float *high)
{
    /* The running maxima live on this thread's stack: callers' maxima of
     * neighbouring chunks share cache lines, which threads would fight over. */
    float top[TQ_LUT_MAX_QUERIES];
    float *local = high != NULL ? top : NULL;
    if (high != NULL)
        memcpy(top, high, sizeof(float) * (size_t)m);
#ifdef TQ_LUT_X86
    switch (variant) {
    case TQ_AVX512:
        tq_lut_scores_avx512(codes, n, row_bytes, bits, centroids, queries, m, d, scales, out,
                             out_stride, accumulate, local);
        break;
    case TQ_AVX2:
        tq_lut_scores_avx2(codes, n, row_bytes, bits, centroids, queries, m, d, scales, out,
                           out_stride, accumulate, local);
        break;
    default:
        tq_lut_scores_portable(codes, n, row_bytes, bits, centroids, queries, m, d, scales, out,
                               out_stride, accumulate, local);
    }
#else
    tq_lut_scores_portable(codes, n, row_bytes, bits, centroids, queries, m, d, scales, out,
                           out_stride, accumulate, local);
#endif
    if (high != NULL)
        memcpy(high, top, sizeof(float) * (size_t)m);
}

/* acc[q * d + j] += sum over rows 0..n-1 of (float)(weights[q * weight_stride + i] * scales[i])
 * * c[idx(i, j)] for the m <= TQ_LUT_MAX_QUERIES queries. Rows go in blocks of
 * TQ_LUT_WEIGHT_ROWS whose weights are scaled first, into a buffer on the stack;
 * each query's result is the same as on its own. */
static inline void tq_lut_weighted_sum(int variant, const uint8_t *codes, ptrdiff_t n, ptrdiff_t row_bytes,
                                       int bits, const float *centroids, const float *weights,
                                       ptrdiff_t weight_stride, ptrdiff_t m, const double *scales,
                                       ptrdiff_t d, float *acc)
{
    float row_weights[TQ_LUT_MAX_QUERIES * TQ_LUT_WEIGHT_ROWS];
        for (ptrdiff_t i0 = 0; i0 < n; i0 += TQ_LUT_WEIGHT_ROWS) {
        const ptrdiff_t rows = n - i0 < TQ_LUT_WEIGHT_ROWS ? n - i0 : TQ_LUT_WEIGHT_ROWS;
        const uint8_t *block = codes + i0 * row_bytes;
        for (ptrdiff_t q = 0; q < m; q++)
            for (ptrdiff_t i = 0; i < rows; i++)
                row_weights[q * TQ_LUT_WEIGHT_ROWS + i] =
                    (float)((double)weights[q * weight_stride + i0 + i] * scales[i0 + i]);
#ifdef TQ_LUT_X86
        if (variant == TQ_AVX512) {
            tq_lut_weighted_sum_avx512(block, rows, row_bytes, bits, centroids, row_weights, m, d, acc);
            continue;
        }
#endif
        for (ptrdiff_t q = 0; q < m; q++) {
#ifdef TQ_LUT_X86
            if (variant == TQ_AVX2) {
                tq_lut_weighted_sum_avx2(block, rows, row_bytes, bits, centroids,
                                         row_weights + q * TQ_LUT_WEIGHT_ROWS, d, acc + q * d);
                continue;
            }
#endif
            tq_lut_weighted_sum_portable(block, rows, row_bytes, bits, centroids,
                                         row_weights + q * TQ_LUT_WEIGHT_ROWS, d, acc + q * d);
        }
    }
}

#endif /* TQ_LUT_H */
