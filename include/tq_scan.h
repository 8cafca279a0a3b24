/* Fast scan of 1, 2 and 4-bit codes for nearest-neighbour search, and the
 * bounded heaps that keep the best candidates.
 *
 * Codes are regrouped into "nibbles": nibble g of a packed row is bits 4g ..
 * 4g+3 of its little-endian bit stream, i.e. 4 / bits whole coordinates. A
 * query's contribution to a row's score is then a sum of one table entry per
 * nibble, and a table of 16 entries fits one SIMD lane: PSHUFB looks 32 rows
 * up at once (FAISS's fast-scan idea, applied to per-coordinate codes).
 *
 * Block layout. Rows are stored in blocks of TQ_SCAN_BLOCK (32) rows. A block
 * holds, for each of the row's nibbles (padded to an even count), 16 bytes:
 * byte t of nibble g has the nibble g of row sigma(t) in its low half and of
 * row 16 + sigma(t) in its high half, with sigma(t) = t / 2 + 8 (t % 2).
 * That order makes the 16-bit lanes of a PSHUFB result, split into their low
 * and high bytes, come out as rows 0..7 and 8..15 in order. Rows past the end
 * of the index are zero codes, never reported.
 *
 * Tables. For a query, nibble g's 16 float entries are quantized to the
 * integers 0 .. TQ_SCAN_LEVELS with one step `delta` and a per-nibble offset
 * (the entry minimum); a row's approximate inner product is
 * delta * (sum of its integer entries) + bias, bias the sum of the offsets. The uint8 sums are exact integers on every
 * variant, so approximate keys are bit-identical across variants and thread
 * counts; candidates are then rescored exactly with the float tables.
 *
 * Keys. Every row i has a key scale[i] * ip + offset[i] (offset NULL: 0) to
 * be maximised, ip its inner product in the rotated unit domain; the heaps
 * order by key, then by the smaller id.
 */
#ifndef TQ_SCAN_H
#define TQ_SCAN_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tq_tile.h"

#define TQ_SCAN_BLOCK 32
/* Largest table entry: two entries add up in a byte (the AVX2 loop adds the
 * lookups of two nibble pairs before widening). */
#define TQ_SCAN_LEVELS 127
/* Nibble pairs summed in 16-bit lanes before widening: 512 * 127 < 65536. */
#define TQ_SCAN_CHUNK_PAIRS 512
/* Code bytes of the blocks every query's table goes over in turn (about half an L1). */
#define TQ_SCAN_TILE_BYTES 16384

#if defined(__GNUC__) || defined(__clang__)
#define tq_scan_lowest_bit(x) __builtin_ctz(x)
#else
static inline int tq_scan_lowest_bit(uint32_t x)
{
    int r = 0;
    while (!(x & 1u)) {
        x >>= 1;
        r++;
    }
    return r;
}
#endif

/* Nibbles of a row of d coordinates of `bits` (1, 2 or 4) bits, padded to an even count. */
static inline ptrdiff_t tq_scan_nibbles(ptrdiff_t d, int bits)
{
    ptrdiff_t nibbles = (d * bits + 3) / 4;
    return nibbles + (nibbles & 1);
}

static inline ptrdiff_t tq_scan_block_bytes(ptrdiff_t nibbles) { return 16 * nibbles; }

/* Byte of a block holding row r (0..31) of nibble g, and whether it is the high half. */
static inline ptrdiff_t tq_scan_byte(ptrdiff_t g, int r)
{
    const int low = r & 15;
    return 16 * g + 2 * (low & 7) + (low >> 3);
}

/* Nibble g of a packed row of row_bytes bytes (0 past its end). */
static inline unsigned tq_scan_row_nibble(const uint8_t *row, ptrdiff_t g, ptrdiff_t row_bytes)
{
    if ((g >> 1) >= row_bytes)
        return 0;
    return (row[g >> 1] >> (4 * (g & 1))) & 15u;
}

/* Write rows 0..count-1 (packed, row_bytes each) at positions first .. first+count-1
 * of the block layout; the blocks they touch must be zeroed where unwritten. */
static void tq_scan_pack(const uint8_t *rows, ptrdiff_t count, ptrdiff_t row_bytes, ptrdiff_t nibbles,
                         uint8_t *blocks, ptrdiff_t first)
{
    const ptrdiff_t block_bytes = tq_scan_block_bytes(nibbles);
    for (ptrdiff_t i = 0; i < count; i++) {
        const ptrdiff_t position = first + i;
        uint8_t *block = blocks + (position / TQ_SCAN_BLOCK) * block_bytes;
        const int r = (int)(position % TQ_SCAN_BLOCK), shift = 4 * (r >> 4);
        const uint8_t keep = (uint8_t)(0xF0u >> shift);
        for (ptrdiff_t g = 0; g < nibbles; g++) {
            uint8_t *byte = block + tq_scan_byte(g, r);
            *byte = (uint8_t)((*byte & keep) | (tq_scan_row_nibble(rows + i * row_bytes, g, row_bytes) << shift));
        }
    }
}

/* Nibble g of the row at `position` of the block layout. */
static inline unsigned tq_scan_nibble(const uint8_t *blocks, ptrdiff_t block_bytes, ptrdiff_t position,
                                      ptrdiff_t g)
{
    const int r = (int)(position % TQ_SCAN_BLOCK);
    const uint8_t byte = blocks[(position / TQ_SCAN_BLOCK) * block_bytes + tq_scan_byte(g, r)];
    return (byte >> (4 * (r >> 4))) & 15u;
}

/* The packed rows (row_bytes each) at `positions` of the block layout. */
static void tq_scan_unpack(const uint8_t *blocks, ptrdiff_t nibbles, const int64_t *positions,
                           ptrdiff_t count, ptrdiff_t row_bytes, uint8_t *rows)
{
    const ptrdiff_t block_bytes = tq_scan_block_bytes(nibbles);
    for (ptrdiff_t i = 0; i < count; i++) {
        uint8_t *row = rows + i * row_bytes;
        memset(row, 0, (size_t)row_bytes);
        for (ptrdiff_t g = 0; g < nibbles && (g >> 1) < row_bytes; g++)
            row[g >> 1] |= (uint8_t)(tq_scan_nibble(blocks, block_bytes, positions[i], g) << (4 * (g & 1)));
    }
}

/* The least and largest entries of nibble g's table: sums of each of its
 * coordinates' extreme products with the ascending centroids. */
static inline void tq_scan_nibble_range(const float *query, ptrdiff_t d, int bits, const double *centroids,
                                        ptrdiff_t g, double *low, double *high)
{
    const int per_nibble = 4 / bits;
    const double least = centroids[0], largest = centroids[(1u << bits) - 1u];
    double lo = 0.0, hi = 0.0;
    for (int c = 0; c < per_nibble; c++) {
        const ptrdiff_t j = g * per_nibble + c;
        const double value = j < d ? (double)query[j] : 0.0;
        lo += value >= 0.0 ? value * least : value * largest;
        hi += value >= 0.0 ? value * largest : value * least;
    }
    *low = lo;
    *high = hi;
}

/* The tables of one rotated query (d floats) for codes of `bits` bits with
 * the ascending `centroids`: exact[16 g + v] (float64) is nibble g's
 * contribution when it holds v (the sum over its coordinates c of
 * query[c] * centroids[c's bits of v], 0 past d), table[16 g + v] its
 * quantization to 0 .. TQ_SCAN_LEVELS; *delta and *bias as above. */
static void tq_scan_tables(const float *query, ptrdiff_t d, int bits, const double *centroids,
                           ptrdiff_t nibbles, double *exact, uint8_t *table, double *delta, double *bias)
{
    const int per_nibble = 4 / bits;
    const unsigned mask = (1u << bits) - 1u;
    double widest = 0.0, low_sum = 0.0, low, high;
    for (ptrdiff_t g = 0; g < nibbles; g++) {
        double product[4][16];   /* product[c][i]: coordinate c of the nibble times centroid i */
        for (int c = 0; c < per_nibble; c++) {
            const ptrdiff_t j = g * per_nibble + c;
            const double value = j < d ? (double)query[j] : 0.0;
            for (unsigned i = 0; i <= mask; i++)
                product[c][i] = value * centroids[i];
        }
        double *row = exact + 16 * g;
        if (bits == 4) {
            for (unsigned v = 0; v < 16; v++)
                row[v] = product[0][v];
        } else if (bits == 2) {
            for (unsigned v = 0; v < 16; v++)
                row[v] = product[0][v & 3u] + product[1][v >> 2];
        } else {
            for (unsigned v = 0; v < 16; v++)
                row[v] = ((product[0][v & 1u] + product[1][(v >> 1) & 1u]) + product[2][(v >> 2) & 1u]) +
                         product[3][v >> 3];
        }
        tq_scan_nibble_range(query, d, bits, centroids, g, &low, &high);
        widest = high - low > widest ? high - low : widest;
        low_sum += low;
    }
    const double step = widest > 0.0 ? widest / TQ_SCAN_LEVELS : 1.0, inverse = 1.0 / step;
    for (ptrdiff_t g = 0; g < nibbles; g++) {
        tq_scan_nibble_range(query, d, bits, centroids, g, &low, &high);
        for (unsigned v = 0; v < 16; v++) {
            const double level = (exact[16 * g + v] - low) * inverse + 0.5;
            const int rounded = level <= 0.0 ? 0 : (int)level;
            table[16 * g + v] = (uint8_t)(rounded > TQ_SCAN_LEVELS ? TQ_SCAN_LEVELS : rounded);
        }
    }
    *delta = step;
    *bias = low_sum;
}

/* Exact inner product (rotated unit domain) of the row at `position` with a query's exact tables. */
static inline double tq_scan_exact(const uint8_t *blocks, ptrdiff_t nibbles, ptrdiff_t position,
                                   const double *exact)
{
    const int r = (int)(position % TQ_SCAN_BLOCK), shift = 4 * (r >> 4);
    const uint8_t *bytes = blocks + (position / TQ_SCAN_BLOCK) * tq_scan_block_bytes(nibbles) + tq_scan_byte(0, r);
    double a0 = 0.0, a1 = 0.0;
    for (ptrdiff_t g = 0; g < nibbles; g += 2) {   /* nibbles is even */
        a0 += exact[16 * g + ((bytes[16 * g] >> shift) & 15u)];
        a1 += exact[16 * g + 16 + ((bytes[16 * g + 16] >> shift) & 15u)];
    }
    return a0 + a1;
}

/* ------------------------------------------------------------------------ */
/* Bounded heaps                                                              */
/* ------------------------------------------------------------------------ */

typedef struct {
    double key;
    int64_t id;
    int64_t position;
} tq_candidate;

/* a ranks before b: larger key, then smaller id. */
static inline int tq_candidate_before(const tq_candidate *a, const tq_candidate *b)
{
    return a->key > b->key || (a->key == b->key && a->id < b->id);
}

/* A heap of at most `capacity` candidates whose root is the worst kept. */
typedef struct {
    tq_candidate *items;
    ptrdiff_t size, capacity;
} tq_heap;

static inline void tq_heap_sift_down(tq_heap *heap, ptrdiff_t i)
{
    tq_candidate *items = heap->items;
    for (;;) {
        ptrdiff_t worst = i, left = 2 * i + 1, right = left + 1;
        if (left < heap->size && tq_candidate_before(&items[worst], &items[left]))
            worst = left;
        if (right < heap->size && tq_candidate_before(&items[worst], &items[right]))
            worst = right;
        if (worst == i)
            return;
        tq_candidate swap = items[i];
        items[i] = items[worst];
        items[worst] = swap;
        i = worst;
    }
}

/* Keep `c` if it is among the best `capacity` seen. */
static inline void tq_heap_offer(tq_heap *heap, tq_candidate c)
{
    tq_candidate *items = heap->items;
    if (heap->size < heap->capacity) {
        ptrdiff_t i = heap->size++;
        while (i > 0) {
            const ptrdiff_t parent = (i - 1) / 2;
            if (!tq_candidate_before(&items[parent], &c))
                break;
            items[i] = items[parent];
            i = parent;
        }
        items[i] = c;
    } else if (heap->capacity > 0 && tq_candidate_before(&c, &items[0])) {
        items[0] = c;
        tq_heap_sift_down(heap, 0);
    }
}

/* tq_heap_offer of the row at `position` with `key` and `id`. */
static inline void tq_heap_offer_row(tq_heap *heap, double key, int64_t id, int64_t position)
{
    tq_candidate c = {key, id, position};
    tq_heap_offer(heap, c);
}

/* The smallest key a candidate needs to be considered (-inf while not full). */
static inline double tq_heap_threshold(const tq_heap *heap)
{
    return heap->size < heap->capacity ? -INFINITY : heap->items[0].key;
}

/* Sort the heap's items best first (heap order is destroyed). */
static void tq_heap_sort(tq_heap *heap)
{
    const ptrdiff_t size = heap->size;
    while (heap->size > 1) {
        tq_candidate worst = heap->items[0];
        heap->items[0] = heap->items[--heap->size];
        tq_heap_sift_down(heap, 0);
        heap->items[heap->size] = worst;
    }
    heap->size = size;
}

/* ------------------------------------------------------------------------ */
/* Block scan: the approximate keys of one block's rows for one query         */
/* ------------------------------------------------------------------------ */

/* The approximate keys of a block's 32 rows for one query (float32:
 * scale * (step * sum + base) + offset, in that order on every variant) into
 * keys[32], and the mask of the first `rows` whose key is >= threshold. */
typedef struct {
    const float *scale, *offset;   /* the block's first row; offset may be NULL */
    float step, base, threshold;
    /* the least and largest scale and the largest offset of the block's rows */
    float scale_low, scale_high, offset_high;
    int rows;
} tq_scan_key_terms;

/* Whether a row whose integer sum is at most max_sum may have a key >= the
 * threshold: an upper bound of the block's keys, widened by far more than the
 * float32 rounding of any key, so a block it rules out holds no such row. */
static inline int tq_scan_block_may_pass(uint32_t max_sum, const tq_scan_key_terms *terms)
{
    const double stepped = (double)terms->step * (double)max_sum, approx = stepped + (double)terms->base;
    const double bound = (approx >= 0.0 ? terms->scale_high : terms->scale_low) * approx + terms->offset_high;
    const double slack = 1e-5 * ((double)terms->scale_high * (fabs(stepped) + fabs((double)terms->base)) +
                                 fabs((double)terms->offset_high)) + 1e-30;
    return bound + slack >= (double)terms->threshold;
}

/* The keys and mask of terms->rows rows from their integer table sums. */
static inline uint32_t tq_scan_keys_of_sums(const uint32_t *sums, const tq_scan_key_terms *terms, float *keys)
{
    uint32_t mask = 0;
    for (int r = 0; r < terms->rows; r++) {
        float key = terms->scale[r] * (terms->step * (float)sums[r] + terms->base);
        if (terms->offset != NULL)
            key = key + terms->offset[r];
        keys[r] = key;
        mask |= (uint32_t)(key >= terms->threshold) << r;
    }
    return mask;
}

TQ_INLINE uint32_t tq_scan_block_keys_portable(const uint8_t *block, const uint8_t *table, ptrdiff_t nibbles,
                                               const tq_scan_key_terms *terms, float *keys)
{
    uint32_t acc[TQ_SCAN_BLOCK] = {0};
    for (ptrdiff_t g = 0; g < nibbles; g++) {
        const uint8_t *bytes = block + 16 * g, *entries = table + 16 * g;
        for (int t = 0; t < 16; t++) {
            const int r = t / 2 + 8 * (t % 2);
            acc[r] += entries[bytes[t] & 15u];
            acc[16 + r] += entries[bytes[t] >> 4];
        }
    }
    uint32_t max_sum = 0;
    for (int r = 0; r < TQ_SCAN_BLOCK; r++)
        max_sum = acc[r] > max_sum ? acc[r] : max_sum;
    if (!tq_scan_block_may_pass(max_sum, terms))
        return 0;
    return tq_scan_keys_of_sums(acc, terms, keys);
}

#ifdef TQ_X86_VARIANTS
#include <immintrin.h>

/* 16 uint16 lanes of two 128-bit halves, each half 8 rows: their sum as 8 uint32. */
TQ_AVX2_TARGET static inline __m256i tq_scan_fold(__m256i v)
{
    return _mm256_add_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)),
                            _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)));
}

TQ_AVX2_TARGET static uint32_t tq_scan_block_keys_avx2(const uint8_t *block, const uint8_t *table,
                                                        ptrdiff_t nibbles, const tq_scan_key_terms *terms,
                                                        float *keys)
{
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    __m256i total[4];
    for (int k = 0; k < 4; k++)
        total[k] = _mm256_setzero_si256();
    for (ptrdiff_t g0 = 0; g0 < nibbles; g0 += 2 * TQ_SCAN_CHUNK_PAIRS) {
        const ptrdiff_t g1 = g0 + 2 * TQ_SCAN_CHUNK_PAIRS < nibbles ? g0 + 2 * TQ_SCAN_CHUNK_PAIRS : nibbles;
        /* words: all bytes (odd ones times 256, wrapping); high: the odd bytes */
        __m256i words_lo = _mm256_setzero_si256(), high_lo = _mm256_setzero_si256();
        __m256i words_hi = _mm256_setzero_si256(), high_hi = _mm256_setzero_si256();
        ptrdiff_t g = g0;
        for (; g + 4 <= g1; g += 4) {   /* two pairs, their lookups added in bytes first */
            const __m256i codes0 = _mm256_loadu_si256((const __m256i *)(block + 16 * g));
            const __m256i codes1 = _mm256_loadu_si256((const __m256i *)(block + 16 * g + 32));
            const __m256i entries0 = _mm256_loadu_si256((const __m256i *)(table + 16 * g));
            const __m256i entries1 = _mm256_loadu_si256((const __m256i *)(table + 16 * g + 32));
            const __m256i lo = _mm256_add_epi8(
                _mm256_shuffle_epi8(entries0, _mm256_and_si256(codes0, low_nibbles)),
                _mm256_shuffle_epi8(entries1, _mm256_and_si256(codes1, low_nibbles)));
            const __m256i hi = _mm256_add_epi8(
                _mm256_shuffle_epi8(entries0, _mm256_and_si256(_mm256_srli_epi16(codes0, 4), low_nibbles)),
                _mm256_shuffle_epi8(entries1, _mm256_and_si256(_mm256_srli_epi16(codes1, 4), low_nibbles)));
            words_lo = _mm256_add_epi16(words_lo, lo);
            high_lo = _mm256_add_epi16(high_lo, _mm256_srli_epi16(lo, 8));
            words_hi = _mm256_add_epi16(words_hi, hi);
            high_hi = _mm256_add_epi16(high_hi, _mm256_srli_epi16(hi, 8));
        }
        if (g < g1) {   /* a last single pair */
            const __m256i codes = _mm256_loadu_si256((const __m256i *)(block + 16 * g));
            const __m256i entries = _mm256_loadu_si256((const __m256i *)(table + 16 * g));
            const __m256i lo = _mm256_shuffle_epi8(entries, _mm256_and_si256(codes, low_nibbles));
            const __m256i hi = _mm256_shuffle_epi8(entries, _mm256_and_si256(_mm256_srli_epi16(codes, 4), low_nibbles));
            words_lo = _mm256_add_epi16(words_lo, lo);
            high_lo = _mm256_add_epi16(high_lo, _mm256_srli_epi16(lo, 8));
            words_hi = _mm256_add_epi16(words_hi, hi);
            high_hi = _mm256_add_epi16(high_hi, _mm256_srli_epi16(hi, 8));
        }
        /* even bytes = rows 0..7 (16..23), odd bytes = rows 8..15 (24..31) */
        total[0] = _mm256_add_epi32(total[0], tq_scan_fold(_mm256_sub_epi16(words_lo, _mm256_slli_epi16(high_lo, 8))));
        total[1] = _mm256_add_epi32(total[1], tq_scan_fold(high_lo));
        total[2] = _mm256_add_epi32(total[2], tq_scan_fold(_mm256_sub_epi16(words_hi, _mm256_slli_epi16(high_hi, 8))));
        total[3] = _mm256_add_epi32(total[3], tq_scan_fold(high_hi));
    }
    /* rows past terms->rows (zero codes) can only raise the maximum, and the bound with it */
    __m256i top = _mm256_max_epu32(_mm256_max_epu32(total[0], total[1]), _mm256_max_epu32(total[2], total[3]));
    __m128i top4 = _mm_max_epu32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    top4 = _mm_max_epu32(top4, _mm_shuffle_epi32(top4, 0x4E));
    top4 = _mm_max_epu32(top4, _mm_shuffle_epi32(top4, 0xB1));
    if (!tq_scan_block_may_pass((uint32_t)_mm_cvtsi128_si32(top4), terms))
        return 0;
    if (terms->rows < TQ_SCAN_BLOCK) {   /* the last block: no reads past the rows held */
        uint32_t sums[TQ_SCAN_BLOCK];
        for (int k = 0; k < 4; k++)
            _mm256_storeu_si256((__m256i *)(sums + 8 * k), total[k]);
        return tq_scan_keys_of_sums(sums, terms, keys);
    }
    const __m256 step = _mm256_set1_ps(terms->step), base = _mm256_set1_ps(terms->base);
    const __m256 threshold = _mm256_set1_ps(terms->threshold);
    uint32_t mask = 0;
    for (int k = 0; k < 4; k++) {
        __m256 key = _mm256_mul_ps(_mm256_loadu_ps(terms->scale + 8 * k),
                                   _mm256_add_ps(_mm256_mul_ps(step, _mm256_cvtepi32_ps(total[k])), base));
        if (terms->offset != NULL)
            key = _mm256_add_ps(key, _mm256_loadu_ps(terms->offset + 8 * k));
        _mm256_storeu_ps(keys + 8 * k, key);
        mask |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(key, threshold, _CMP_GE_OQ)) << (8 * k);
    }
    return mask;
}
#endif

static inline uint32_t tq_scan_block_keys(int variant, const uint8_t *block, const uint8_t *table,
                                          ptrdiff_t nibbles, const tq_scan_key_terms *terms, float *keys)
{
#ifdef TQ_X86_VARIANTS
    if (variant != TQ_PORTABLE)
        return tq_scan_block_keys_avx2(block, table, nibbles, terms, keys);
#endif
    return tq_scan_block_keys_portable(block, table, nibbles, terms, keys);
}

/* ------------------------------------------------------------------------ */
/* Entry points                                                              */
/* ------------------------------------------------------------------------ */

/* Offer the rows of blocks b0 .. b1-1 (n rows in all) to the heaps of m queries
 * (heaps[q], capacity >= 1), by their approximate keys. tables: m rows of
 * 16 * nibbles uint8; delta, bias: m each; block_terms: per block, the least
 * and largest scale and the largest offset (0 without offsets) of its rows. */
static void tq_scan_blocks(int variant, const uint8_t *blocks, ptrdiff_t nibbles, ptrdiff_t n,
                           ptrdiff_t b0, ptrdiff_t b1, const uint8_t *tables, const double *delta,
                           const double *bias, ptrdiff_t m, const float *scale, const float *offset,
                           const float *block_terms, const int64_t *ids, tq_heap *heaps)
{
    const ptrdiff_t block_bytes = tq_scan_block_bytes(nibbles);
    float keys[TQ_SCAN_BLOCK];
    /* Tiles of blocks small enough to stay in L1 while every query's table goes over them. */
    const ptrdiff_t tile = block_bytes >= TQ_SCAN_TILE_BYTES ? 1 : TQ_SCAN_TILE_BYTES / block_bytes;
    for (ptrdiff_t t0 = b0; t0 < b1; t0 += tile) {
        const ptrdiff_t t1 = t0 + tile < b1 ? t0 + tile : b1;
        for (ptrdiff_t q = 0; q < m; q++) {
            tq_heap *heap = &heaps[q];
            for (ptrdiff_t b = t0; b < t1; b++) {
                const ptrdiff_t first = b * TQ_SCAN_BLOCK;
                tq_scan_key_terms terms;
                terms.scale = scale + first;
                terms.offset = offset != NULL ? offset + first : NULL;
                terms.rows = n - first < TQ_SCAN_BLOCK ? (int)(n - first) : TQ_SCAN_BLOCK;
                terms.scale_low = block_terms[3 * b];
                terms.scale_high = block_terms[3 * b + 1];
                terms.offset_high = block_terms[3 * b + 2];
                terms.step = (float)delta[q];
                terms.base = (float)bias[q];
                terms.threshold = (float)tq_heap_threshold(heap);
                uint32_t mask = tq_scan_block_keys(variant, blocks + b * block_bytes, tables + q * 16 * nibbles,
                                                   nibbles, &terms, keys);
                while (mask) {
                    const int r = tq_scan_lowest_bit(mask);
                    mask &= mask - 1;
                    if ((double)keys[r] >= tq_heap_threshold(heap))
                        tq_heap_offer_row(heap, (double)keys[r], ids[first + r], first + r);
                }
            }
        }
    }
}

#endif /* TQ_SCAN_H */
