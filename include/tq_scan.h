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
 * holds, for each of the row's nibbles (padded to a multiple of 4), 16 bytes:
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

/* Nibbles of a row of d coordinates of `bits` (1, 2 or 4) bits, padded to a
 * multiple of 4 (the AVX2 loop takes two pairs of nibbles at a time). */
static inline ptrdiff_t tq_scan_nibbles(ptrdiff_t d, int bits)
{
    return (d * bits + 15) / 16 * 4;
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
    for (ptrdiff_t g = 0; g < nibbles; g += 2) {   /* nibbles is a multiple of 4 */
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
/* Block scan                                                                 */
/* ------------------------------------------------------------------------ */

/* What the scan needs of one query: its integer table, the float32 step and
 * base of its approximate inner products, and its heap. */
typedef struct {
    const uint8_t *table;
    float step, base;
    tq_heap *heap;
} tq_scan_query;

/* What it needs of one block: its rows' scales and offsets (offset may be
 * NULL), the rows held, and the least and largest scale and the largest offset. */
typedef struct {
    const float *scale, *offset;
    const int64_t *ids;
    ptrdiff_t first;
    int rows;
    float scale_low, scale_high, offset_high;
} tq_scan_block_terms;

/* Whether a row whose integer sum is at most max_sum may have a key >= the
 * query's threshold: an upper bound of the block's keys, widened by far more
 * than the float32 rounding of any key, so a block it rules out holds no such row. */
static inline int tq_scan_block_may_pass(uint32_t max_sum, const tq_scan_query *query,
                                         const tq_scan_block_terms *block, double threshold)
{
    const double stepped = (double)query->step * (double)max_sum, approx = stepped + (double)query->base;
    const double bound = (approx >= 0.0 ? block->scale_high : block->scale_low) * approx + block->offset_high;
    const double slack = 1e-5 * ((double)block->scale_high * (fabs(stepped) + fabs((double)query->base)) +
                                 fabs((double)block->offset_high)) + 1e-30;
    return bound + slack >= threshold;
}

/* Offer the block's rows whose keys (float32 scale * (step * sum + base) +
 * offset, in that order on every variant) reach the heap's threshold. */
static inline void tq_scan_offer_sums(const uint32_t *sums, const tq_scan_query *query,
                                      const tq_scan_block_terms *block)
{
    tq_heap *heap = query->heap;
    for (int r = 0; r < block->rows; r++) {
        float key = block->scale[r] * (query->step * (float)sums[r] + query->base);
        if (block->offset != NULL)
            key = key + block->offset[r];
        if ((double)key >= tq_heap_threshold(heap))
            tq_heap_offer_row(heap, (double)key, block->ids[r], block->first + r);
    }
}

/* The integer sums of a block's rows for one query, then their offers. */
static void tq_scan_block_portable(const uint8_t *block, ptrdiff_t nibbles, const tq_scan_query *query,
                                   const tq_scan_block_terms *terms)
{
    uint32_t sums[TQ_SCAN_BLOCK] = {0}, max_sum = 0;
    for (ptrdiff_t g = 0; g < nibbles; g++) {
        const uint8_t *bytes = block + 16 * g, *entries = query->table + 16 * g;
        for (int t = 0; t < 16; t++) {
            const int r = t / 2 + 8 * (t % 2);
            sums[r] += entries[bytes[t] & 15u];
            sums[16 + r] += entries[bytes[t] >> 4];
        }
    }
    /* rows past terms->rows (zero codes) can only raise the maximum, and the bound with it */
    for (int r = 0; r < TQ_SCAN_BLOCK; r++)
        max_sum = sums[r] > max_sum ? sums[r] : max_sum;
    if (tq_scan_block_may_pass(max_sum, query, terms, tq_heap_threshold(query->heap)))
        tq_scan_offer_sums(sums, query, terms);
}

#ifdef TQ_X86_VARIANTS
#include <immintrin.h>

#define TQ_SCAN_AVX2_INLINE TQ_AVX2_TARGET static inline __attribute__((always_inline))

/* 16 uint16 lanes of two 128-bit halves, each half 8 rows: their sum as 8 uint32. */
TQ_SCAN_AVX2_INLINE __m256i tq_scan_fold(__m256i v)
{
    return _mm256_add_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)),
                            _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)));
}

/* Add nibbles g0 .. g1-1 (a multiple of 4, at most 2 * TQ_SCAN_CHUNK_PAIRS)
 * of a block's 32 rows for Q (1 or 2, a constant) queries at once, sharing the
 * code loads, to total[q][k] (rows 8k .. 8k+7). Lookups of two nibble pairs
 * add up in bytes (entries are at most TQ_SCAN_LEVELS), then in 16-bit lanes:
 * "words" sum all bytes (odd ones times 256, wrapping), "high" the odd bytes;
 * even bytes are rows 0..7 (16..23) and odd bytes rows 8..15 (24..31). */
TQ_SCAN_AVX2_INLINE void tq_scan_pairs_avx2(const uint8_t *block, ptrdiff_t g0, ptrdiff_t g1,
                                            const tq_scan_query *queries, const int Q, __m256i total[2][4])
{
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    __m256i wl[2], hl[2], wh[2], hh[2];
    for (int q = 0; q < Q; q++)
        wl[q] = hl[q] = wh[q] = hh[q] = _mm256_setzero_si256();
    for (ptrdiff_t g = g0; g < g1; g += 4) {
        const __m256i codes0 = _mm256_loadu_si256((const __m256i *)(block + 16 * g));
        const __m256i codes1 = _mm256_loadu_si256((const __m256i *)(block + 16 * g + 32));
        const __m256i lo0 = _mm256_and_si256(codes0, low_nibbles), lo1 = _mm256_and_si256(codes1, low_nibbles);
        const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(codes0, 4), low_nibbles);
        const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(codes1, 4), low_nibbles);
#pragma GCC unroll 2
        for (int q = 0; q < Q; q++) {
            const __m256i e0 = _mm256_loadu_si256((const __m256i *)(queries[q].table + 16 * g));
            const __m256i e1 = _mm256_loadu_si256((const __m256i *)(queries[q].table + 16 * g + 32));
            const __m256i lo = _mm256_add_epi8(_mm256_shuffle_epi8(e0, lo0), _mm256_shuffle_epi8(e1, lo1));
            const __m256i hi = _mm256_add_epi8(_mm256_shuffle_epi8(e0, hi0), _mm256_shuffle_epi8(e1, hi1));
            wl[q] = _mm256_add_epi16(wl[q], lo);
            hl[q] = _mm256_add_epi16(hl[q], _mm256_srli_epi16(lo, 8));
            wh[q] = _mm256_add_epi16(wh[q], hi);
            hh[q] = _mm256_add_epi16(hh[q], _mm256_srli_epi16(hi, 8));
        }
    }
    for (int q = 0; q < Q; q++) {
        total[q][0] = _mm256_add_epi32(total[q][0], tq_scan_fold(_mm256_sub_epi16(wl[q], _mm256_slli_epi16(hl[q], 8))));
        total[q][1] = _mm256_add_epi32(total[q][1], tq_scan_fold(hl[q]));
        total[q][2] = _mm256_add_epi32(total[q][2], tq_scan_fold(_mm256_sub_epi16(wh[q], _mm256_slli_epi16(hh[q], 8))));
        total[q][3] = _mm256_add_epi32(total[q][3], tq_scan_fold(hh[q]));
    }
}

/* The integer sums of a block's rows for Q queries (widened to 32 bits every
 * TQ_SCAN_CHUNK_PAIRS pairs). */
TQ_SCAN_AVX2_INLINE void tq_scan_sums_avx2(const uint8_t *block, ptrdiff_t nibbles,
                                           const tq_scan_query *queries, const int Q, __m256i total[2][4])
{
    for (int q = 0; q < Q; q++)
        for (int k = 0; k < 4; k++)
            total[q][k] = _mm256_setzero_si256();
    for (ptrdiff_t g0 = 0; g0 < nibbles; g0 += 2 * TQ_SCAN_CHUNK_PAIRS)
        tq_scan_pairs_avx2(block, g0, g0 + 2 * TQ_SCAN_CHUNK_PAIRS < nibbles ? g0 + 2 * TQ_SCAN_CHUNK_PAIRS : nibbles,
                           queries, Q, total);
}

/* The bound check and the offers of one query's block sums. */
TQ_SCAN_AVX2_INLINE void tq_scan_offer_avx2(const __m256i total[4], const tq_scan_query *query,
                                            const tq_scan_block_terms *block)
{
    /* rows past block->rows (zero codes) can only raise the maximum, and the bound with it */
    const __m256i top = _mm256_max_epu32(_mm256_max_epu32(total[0], total[1]), _mm256_max_epu32(total[2], total[3]));
    __m128i top4 = _mm_max_epu32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    top4 = _mm_max_epu32(top4, _mm_shuffle_epi32(top4, 0x4E));
    top4 = _mm_max_epu32(top4, _mm_shuffle_epi32(top4, 0xB1));
    const double threshold = tq_heap_threshold(query->heap);
    if (!tq_scan_block_may_pass((uint32_t)_mm_cvtsi128_si32(top4), query, block, threshold))
        return;
    uint32_t sums[TQ_SCAN_BLOCK];
    for (int k = 0; k < 4; k++)
        _mm256_storeu_si256((__m256i *)(sums + 8 * k), total[k]);
    tq_scan_offer_sums(sums, query, block);
}

/* Blocks b0 .. b1-1 for queries in pairs (and a last single one). */
TQ_AVX2_TARGET static void tq_scan_tile_avx2(const uint8_t *blocks, ptrdiff_t block_bytes, ptrdiff_t nibbles,
                                             ptrdiff_t b0, ptrdiff_t b1, const tq_scan_query *queries,
                                             ptrdiff_t m, const tq_scan_block_terms *terms)
{
    __m256i total[2][4];
    for (ptrdiff_t q = 0; q < m; q += 2) {
        const int pair = q + 1 < m;
        for (ptrdiff_t b = b0; b < b1; b++) {
            const uint8_t *block = blocks + b * block_bytes;
            if (pair) {
                tq_scan_sums_avx2(block, nibbles, queries + q, 2, total);
                tq_scan_offer_avx2(total[0], queries + q, terms + (b - b0));
                tq_scan_offer_avx2(total[1], queries + q + 1, terms + (b - b0));
            } else {
                tq_scan_sums_avx2(block, nibbles, queries + q, 1, total);
                tq_scan_offer_avx2(total[0], queries + q, terms + (b - b0));
            }
        }
    }
}
#endif

/* ------------------------------------------------------------------------ */
/* Entry points                                                              */
/* ------------------------------------------------------------------------ */

/* Offer the rows of blocks b0 .. b1-1 (n rows in all) to the heaps of m queries
 * (heaps[q], capacity >= 1), by their approximate keys. tables: m rows of
 * 16 * nibbles integers; delta, bias: m each; block_terms: per block, the least
 * and largest scale and the largest offset (0 without offsets) of its rows.
 * Blocks go in tiles small enough to stay in L1 while every query's table goes
 * over them. */
static void tq_scan_blocks(int variant, const uint8_t *blocks, ptrdiff_t nibbles, ptrdiff_t n,
                           ptrdiff_t b0, ptrdiff_t b1, const uint8_t *tables, const double *delta,
                           const double *bias, ptrdiff_t m, const float *scale, const float *offset,
                           const float *block_terms, const int64_t *ids, tq_heap *heaps)
{
    enum { TILE_MAX = 64 };
    const ptrdiff_t block_bytes = tq_scan_block_bytes(nibbles);
    ptrdiff_t tile = block_bytes >= TQ_SCAN_TILE_BYTES ? 1 : TQ_SCAN_TILE_BYTES / block_bytes;
    tile = tile > TILE_MAX ? TILE_MAX : tile;
    tq_scan_block_terms terms[TILE_MAX];
    for (ptrdiff_t t0 = b0; t0 < b1; t0 += tile) {
        const ptrdiff_t t1 = t0 + tile < b1 ? t0 + tile : b1;
        for (ptrdiff_t b = t0; b < t1; b++) {
            tq_scan_block_terms *block = &terms[b - t0];
            block->first = b * TQ_SCAN_BLOCK;
            block->scale = scale + block->first;
            block->offset = offset != NULL ? offset + block->first : NULL;
            block->ids = ids + block->first;
            block->rows = n - block->first < TQ_SCAN_BLOCK ? (int)(n - block->first) : TQ_SCAN_BLOCK;
            block->scale_low = block_terms[3 * b];
            block->scale_high = block_terms[3 * b + 1];
            block->offset_high = block_terms[3 * b + 2];
        }
        /* queries in groups whose descriptions fit on the stack */
        for (ptrdiff_t q0 = 0; q0 < m; q0 += 16) {
            tq_scan_query queries[16];
            const ptrdiff_t count = m - q0 < 16 ? m - q0 : 16;
            for (ptrdiff_t q = 0; q < count; q++) {
                queries[q].table = tables + (q0 + q) * 16 * nibbles;
                queries[q].step = (float)delta[q0 + q];
                queries[q].base = (float)bias[q0 + q];
                queries[q].heap = &heaps[q0 + q];
            }
#ifdef TQ_X86_VARIANTS
            if (variant != TQ_PORTABLE) {
                tq_scan_tile_avx2(blocks, block_bytes, nibbles, t0, t1, queries, count, terms);
                continue;
            }
#endif
            for (ptrdiff_t q = 0; q < count; q++)
                for (ptrdiff_t b = t0; b < t1; b++)
                    tq_scan_block_portable(blocks + b * block_bytes, nibbles, &queries[q], &terms[b - t0]);
        }
    }
}

#endif /* TQ_SCAN_H */
