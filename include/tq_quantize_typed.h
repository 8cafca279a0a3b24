/* Norms, cell search and bit packing on a transposed tile of TQ_T.
 *
 * Included once per type by tq_quantize.h, double first (TQ_T, TQ_NAME as in
 * tq_hadamard_typed.h; TQ_BODY(name) names the body of kernel `name` for the
 * type); no include guard on purpose.
 */

/* Norm of d values `stride` apart, with scaling, so that it neither overflows
 * nor underflows; NaN or infinity anywhere gives a non-finite result. */
TQ_INLINE double TQ_NAME(tq_scaled_norm)(const TQ_T *v, ptrdiff_t d, ptrdiff_t stride)
{
    double scale = 0.0, acc = 0.0;
    for (ptrdiff_t j = 0; j < d; j++) {
        const double a = fabs((double)v[j * stride]);
        if (a > scale || a != a)
            scale = a; /* NaN propagates to the result */
    }
    if (scale == 0.0)
        return 0.0;
    for (ptrdiff_t j = 0; j < d; j++) {
        const double a = (double)v[j * stride] / scale;
        acc += a * a;
    }
    return scale * sqrt(acc);
}

/* The norm from its sum of squares `acc`, redone with scaling when the sum left
 * the safe range of double (only possible for double input). */
TQ_INLINE double TQ_NAME(tq_finish_norm)(double acc, const TQ_T *v, ptrdiff_t d,
                                        ptrdiff_t stride)
{
    if (acc < 1e300 && acc > 1e-280)
        return sqrt(acc);
    return TQ_NAME(tq_scaled_norm)(v, d, stride);
}

/* Euclidean norm of a row: squares summed in double in four partial sums by
 * coordinate mod 4 (no long chain of dependent additions), added as
 * (s0 + s1) + (s2 + s3). */
TQ_INLINE double TQ_NAME(tq_row_norm)(const TQ_T *row, ptrdiff_t d)
{
    const ptrdiff_t tail = d - d % 4;
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    for (ptrdiff_t j = 0; j < tail; j += 4) {
        a0 += (double)row[j] * row[j];
        a1 += (double)row[j + 1] * row[j + 1];
        a2 += (double)row[j + 2] * row[j + 2];
        a3 += (double)row[j + 3] * row[j + 3];
    }
    for (ptrdiff_t j = tail; j < d; j++)
        a0 += (double)row[j] * row[j];
    return TQ_NAME(tq_finish_norm)((a0 + a1) + (a2 + a3), row, d, 1);
}

/* tq_row_norm of every lane of a tile (d coordinates), in the same order, and
 * the inverse norms (0 for a zero norm). */
TQ_INLINE void TQ_NAME(tq_tile_norms)(const TQ_T *tile, ptrdiff_t d, double *norms,
                                     double *inv)
{
    const ptrdiff_t tail = d - d % 4;
    double a0[TQ_TILE], a1[TQ_TILE], a2[TQ_TILE], a3[TQ_TILE];
    for (int l = 0; l < TQ_TILE; l++)
        a0[l] = a1[l] = a2[l] = a3[l] = 0.0;
    for (ptrdiff_t j = 0; j < tail; j += 4) {
        const TQ_T *p = tile + j * TQ_TILE;
        for (int l = 0; l < TQ_TILE; l++) {
            const double v0 = p[l], v1 = p[TQ_TILE + l];
            const double v2 = p[2 * TQ_TILE + l], v3 = p[3 * TQ_TILE + l];
            a0[l] += v0 * v0;
            a1[l] += v1 * v1;
            a2[l] += v2 * v2;
            a3[l] += v3 * v3;
        }
    }
    for (ptrdiff_t j = tail; j < d; j++) {
        for (int l = 0; l < TQ_TILE; l++) {
            const double v = tile[j * TQ_TILE + l];
            a0[l] += v * v;
        }
    }
    for (int l = 0; l < TQ_TILE; l++) {
        const double norm = TQ_NAME(tq_finish_norm)((a0[l] + a1[l]) + (a2[l] + a3[l]),
                                                    tile + l, d, TQ_TILE);
        norms[l] = norm;
        inv[l] = norm > 0.0 ? 1.0 / norm : 0.0;
    }
}

/* tile[j, l] = TQ_T(tile[j, l] * inv[l]) * signs[j], the product in double. */
TQ_INLINE void TQ_NAME(tq_normalize)(TQ_T *tile, ptrdiff_t d, const double *inv,
                                    const TQ_T *signs)
{
    for (ptrdiff_t j = 0; j < d; j++) {
        const TQ_T s = signs[j];
        TQ_T *p = tile + j * TQ_TILE;
        for (int l = 0; l < TQ_TILE; l++)
            p[l] = (TQ_T)((double)p[l] * inv[l]) * s;
    }
}

/* tile[j, l] *= inv[l] for the first `coords` tile rows. */
TQ_INLINE void TQ_NAME(tq_scale_lanes)(TQ_T *tile, ptrdiff_t coords, const double *inv)
{
    for (ptrdiff_t j = 0; j < coords; j++) {
        TQ_T *p = tile + j * TQ_TILE;
        for (int l = 0; l < TQ_TILE; l++)
            p[l] = (TQ_T)(p[l] * inv[l]);
    }
}

/* Number of the 2**bits - 1 sorted `bounds` strictly below u: a branch-free
 * binary search. */
TQ_INLINE uint32_t TQ_NAME(tq_cell)(const TQ_T *bounds, const int bits, TQ_T u)
{
    uint32_t idx = 0;
    for (uint32_t step = 1u << (bits - 1); step > 0; step >>= 1)
        idx += bounds[idx + step - 1] < u ? step : 0u;
    return idx;
}

/* Writes the first `bits` bytes of each lane's little-endian word (fewer at the
 * end of a row) as the packed bytes of group g (8 indices fill `bits` bytes). */
#define TQ_WRITE_GROUP(word, g, bits, codes, row_bytes, count)                         \
    do {                                                                               \
        const ptrdiff_t base_ = (g) * (bits);                                          \
        const ptrdiff_t n_ = (row_bytes) - base_ < (bits) ? (row_bytes) - base_ : (bits); \
        for (ptrdiff_t l_ = 0; l_ < (count); l_++) {                                   \
            uint8_t *out_ = (codes) + l_ * (row_bytes) + base_;                        \
            for (ptrdiff_t r_ = 0; r_ < n_; r_++)                                      \
                out_[r_] = (uint8_t)((word)[l_] >> (8 * r_));                          \
        }                                                                              \
    } while (0)

/* Cells of coordinates [j0, j1) of a tile of unit-domain values (coordinate j
 * at u + (j - j0) * TQ_TILE, j0 a multiple of 8), packed into the rows of
 * `codes` for lanes 0 .. count - 1. For bits <= 4 the index is a count of
 * compares (bits is a constant here, so the loop over bounds unrolls and the
 * lanes vectorize); for more bits it is the binary search. */
TQ_INLINE void TQ_NAME(tq_pack_bits)(const TQ_T *u, ptrdiff_t j0, ptrdiff_t j1,
                                    const TQ_T *bounds, const int bits, uint8_t *codes,
                                    ptrdiff_t row_bytes, ptrdiff_t count)
{
    const int n_bounds = (1 << bits) - 1;
    for (ptrdiff_t g = j0 / 8; 8 * g < j1; g++) {
        const ptrdiff_t end = 8 * g + 8 < j1 ? 8 * g + 8 : j1;
        if (bits <= 4) {
            uint32_t word[TQ_TILE];
            for (int l = 0; l < TQ_TILE; l++)
                word[l] = 0;
            for (ptrdiff_t j = 8 * g; j < end; j++) {
                const TQ_T *uj = u + (j - j0) * TQ_TILE;
                const int shift = (int)(j - 8 * g) * bits;
                for (int l = 0; l < TQ_TILE; l++) {
                    uint32_t idx = 0;
                    for (int i = 0; i < n_bounds; i++)
                        idx += bounds[i] < uj[l];
                    word[l] |= idx << shift;
                }
            }
            TQ_WRITE_GROUP(word, g, bits, codes, row_bytes, count);
        } else {
            uint64_t word[TQ_TILE];
            for (int l = 0; l < TQ_TILE; l++)
                word[l] = 0;
            for (ptrdiff_t j = 8 * g; j < end; j++) {
                const TQ_T *uj = u + (j - j0) * TQ_TILE;
                const int shift = (int)(j - 8 * g) * bits;
                for (int l = 0; l < TQ_TILE; l++)
                    word[l] |= (uint64_t)TQ_NAME(tq_cell)(bounds, bits, uj[l]) << shift;
            }
            TQ_WRITE_GROUP(word, g, bits, codes, row_bytes, count);
        }
    }
}

/* tq_pack_bits with `bits` (1..8) as a constant. */
TQ_INLINE void TQ_NAME(tq_pack)(const TQ_T *u, ptrdiff_t j0, ptrdiff_t j1, const TQ_T *bounds,
                               int bits, uint8_t *codes, ptrdiff_t row_bytes, ptrdiff_t count)
{
    switch (bits) {
    case 1: TQ_NAME(tq_pack_bits)(u, j0, j1, bounds, 1, codes, row_bytes, count); break;
    case 2: TQ_NAME(tq_pack_bits)(u, j0, j1, bounds, 2, codes, row_bytes, count); break;
    case 3: TQ_NAME(tq_pack_bits)(u, j0, j1, bounds, 3, codes, row_bytes, count); break;
    case 4: TQ_NAME(tq_pack_bits)(u, j0, j1, bounds, 4, codes, row_bytes, count); break;
    case 5: TQ_NAME(tq_pack_bits)(u, j0, j1, bounds, 5, codes, row_bytes, count); break;
    case 6: TQ_NAME(tq_pack_bits)(u, j0, j1, bounds, 6, codes, row_bytes, count); break;
    case 7: TQ_NAME(tq_pack_bits)(u, j0, j1, bounds, 7, codes, row_bytes, count); break;
    default: TQ_NAME(tq_pack_bits)(u, j0, j1, bounds, 8, codes, row_bytes, count); break;
    }
}

TQ_DEFINE_LOAD(TQ_NAME(tq_load_lanes), TQ_T, TQ_T)

/* tq_load_lanes of all d coordinates; full float tiles by 16 x 16 transposes. */
TQ_INLINE void TQ_NAME(tq_load_same)(TQ_T *tile, const TQ_T *x, ptrdiff_t count, ptrdiff_t d)
{
    ptrdiff_t done = 0;
#ifdef TQ_HAVE_TRANSPOSE16
    if (sizeof(TQ_T) == sizeof(float) && count == TQ_TILE) {
        for (; done + 16 <= d; done += 16)
            tq_transpose16_f((float *)tile + done * TQ_TILE, (const float *)x + done, d);
    }
#endif
    if (done < d)
        TQ_NAME(tq_load_lanes)(tile + done * TQ_TILE, x, count, d, done, d);
}
TQ_DEFINE_RESIDUAL(TQ_NAME(tq_residual_same), TQ_T, TQ_T, TQ_NAME(tq_cell))
TQ_DEFINE_RESIDUAL(TQ_NAME(tq_residual_double), double, TQ_T, tq_cell_d)

/* Fused quantization of rows 0 .. count - 1 (count <= TQ_TILE) of x, rotated
 * by the randomized Hadamard rotation (tq_hadamard.h): their norms into
 * `norms`, their packed cells into the rows of `codes` and, unless `residual`
 * is NULL, the unit-domain residuals u - centroids[cell] into its rows.
 *
 * float rows run in float: normalized first (so that no intermediate can
 * overflow), then rotated, and compared with float bounds rounded down (which
 * gives the cells of the exact comparisons with the double boundaries). double
 * rows run in double as the separate kernels do: rotated, then divided by the
 * norm. `tile` is scratch of TQ_TILE * d values. */
TQ_INLINE void TQ_BODY(tq_hadamard_quantize)(
    int variant, const TQ_T *x, ptrdiff_t count, ptrdiff_t d, const TQ_T *signs,
    ptrdiff_t rounds, ptrdiff_t block, const TQ_T *bounds, int bits, const double *centroids,
    double *norms, uint8_t *codes, ptrdiff_t row_bytes, TQ_T *residual, TQ_T *tile)
{
    const int in_float = sizeof(TQ_T) == sizeof(float);
    const double factor = 1.0 / sqrt((double)block);
    double norm[TQ_TILE], inv[TQ_TILE];
    (void)variant;
    TQ_NAME(tq_load_same)(tile, x, count, d);
    TQ_NAME(tq_tile_norms)(tile, d, norm, inv);
    for (ptrdiff_t l = 0; l < count; l++)
        norms[l] = norm[l];
    if (in_float)
        TQ_NAME(tq_normalize)(tile, d, inv, signs);
    TQ_NAME(tq_rotate_forward)(tile, signs, rounds, d, block, (TQ_T)factor,
                               (TQ_T)pow(factor, (double)rounds), in_float);
    if (!in_float)
        TQ_NAME(tq_scale_lanes)(tile, d, inv);
    TQ_NAME(tq_pack)(tile, 0, d, bounds, bits, codes, row_bytes, count);
    if (residual != NULL)
        TQ_NAME(tq_residual_same)(residual, tile, 0, d, bounds, bits, centroids, count, d);
}

/* Quantization of already rotated rows 0 .. count - 1 of y, in double: the cell
 * of u = double(y[l, j]) / norms[l] (0 for a zero norm) is packed into the rows
 * of `codes` and, unless `residual` is NULL, u - centroids[cell] goes into its
 * rows. Coordinates go TQ_CHUNK at a time through `tile` (TQ_TILE * TQ_CHUNK
 * doubles). */
#define TQ_CHUNK 256

/* At most this many rows are quantized one at a time rather than in a tile, whose
 * sixteen lanes cost the same whatever the count (a decode step's single token). */
#define TQ_ROW_BY_ROW 4

/* One row of tq_quantize_rows, with the tile's arithmetic: the same cells (the
 * binary search counts the boundaries below u, as the tile's compares do) and
 * residuals. */
TQ_INLINE void TQ_NAME(tq_quantize_row)(const TQ_T *y, ptrdiff_t d, double norm, const double *bounds,
                                       int bits, const double *centroids, uint8_t *codes,
                                       ptrdiff_t row_bytes, TQ_T *residual)
{
    const double inv = norm > 0.0 ? 1.0 / norm : 0.0;
    for (ptrdiff_t g = 0; 8 * g < d; g++) {
        const ptrdiff_t end = 8 * g + 8 < d ? 8 * g + 8 : d;
        const ptrdiff_t base = g * bits, n = row_bytes - base < bits ? row_bytes - base : bits;
        uint64_t word = 0;
        for (ptrdiff_t j = 8 * g; j < end; j++) {
            const double u = (double)y[j] * inv;
            const uint32_t cell = tq_cell_d(bounds, bits, u);
            word |= (uint64_t)cell << ((j - 8 * g) * bits);
            if (residual != NULL)
                residual[j] = (TQ_T)(u - centroids[cell]);
        }
        for (ptrdiff_t r = 0; r < n; r++)
            codes[base + r] = (uint8_t)(word >> (8 * r));
    }
}

TQ_INLINE void TQ_BODY(tq_quantize_rows)(
    int variant, const TQ_T *y, ptrdiff_t count, ptrdiff_t d, const double *norms,
    const double *bounds, int bits, const double *centroids, uint8_t *codes,
    ptrdiff_t row_bytes, TQ_T *residual, double *tile)
{
    double inv[TQ_TILE];
    (void)variant;
    if (count <= TQ_ROW_BY_ROW) {
        for (ptrdiff_t l = 0; l < count; l++)
            TQ_NAME(tq_quantize_row)(y + l * d, d, norms[l], bounds, bits, centroids, codes + l * row_bytes,
                                     row_bytes, residual != NULL ? residual + l * d : NULL);
        return;
    }
    for (ptrdiff_t l = 0; l < TQ_TILE; l++)
        inv[l] = l < count && norms[l] > 0.0 ? 1.0 / norms[l] : 0.0;
    for (ptrdiff_t j0 = 0; j0 < d; j0 += TQ_CHUNK) {
        const ptrdiff_t j1 = j0 + TQ_CHUNK < d ? j0 + TQ_CHUNK : d;
        TQ_NAME(tq_load_double)(tile, y, count, d, j0, j1);
        tq_scale_lanes_d(tile, j1 - j0, inv);
        tq_pack_d(tile, j0, j1, bounds, bits, codes, row_bytes, count);
        if (residual != NULL)
            TQ_NAME(tq_residual_double)(residual, tile, j0, j1, bounds, bits, centroids, count, d);
    }
}
