/* The Walsh-Hadamard transform on a transposed tile of TQ_T (float or double).
 *
 * Included once per type by tq_hadamard.h, with TQ_T the tile's type and
 * TQ_NAME(name) its name for that type; no include guard on purpose.
 */

typedef TQ_LANES(TQ_T) TQ_NAME(tq_lanes);

/* One pass of log2(radix) butterfly stages, of strides h, 2h, .. over a
 * power-of-two block of `length` tile rows: each coordinate is loaded and
 * stored once for up to three stages. The pass may first multiply its inputs
 * by `signs` (by position) and finally its outputs by `scale`. The same
 * additions and subtractions as stage-by-stage butterflies, so the same result. */
TQ_INLINE void TQ_NAME(tq_pass)(TQ_T *v, ptrdiff_t length, ptrdiff_t h, const int radix,
                               const TQ_T *signs, TQ_T scale, const int use_signs,
                               const int use_scale)
{
    /* Element m of a butterfly group is tile row j + m h; radix is a constant
     * here, so the unused elements vanish; a whole tile row is one vector value. */
    const ptrdiff_t w = h * TQ_TILE;
    for (ptrdiff_t i = 0; i < length; i += radix * h) {
        for (ptrdiff_t j = i; j < i + h; j++) {
            TQ_T *p = v + j * TQ_TILE;
            TQ_T s0 = 1, s1 = 1, s2 = 1, s3 = 1, s4 = 1, s5 = 1, s6 = 1, s7 = 1;
            if (use_signs) {
                s0 = signs[j];
                if (radix >= 2) s1 = signs[j + h];
                if (radix >= 4) { s2 = signs[j + 2 * h]; s3 = signs[j + 3 * h]; }
                if (radix >= 8) {
                    s4 = signs[j + 4 * h]; s5 = signs[j + 5 * h];
                    s6 = signs[j + 6 * h]; s7 = signs[j + 7 * h];
                }
            }
            for (int l = 0; l < TQ_TILE; l += TQ_LANE_STEP) {
                typedef TQ_NAME(tq_lanes) lanes;
                lanes a0 = *(lanes *)(p + l), a1 = a0, a2 = a0, a3 = a0;
                lanes a4 = a0, a5 = a0, a6 = a0, a7 = a0;
                if (radix >= 2) a1 = *(lanes *)(p + w + l);
                if (radix >= 4) {
                    a2 = *(lanes *)(p + 2 * w + l);
                    a3 = *(lanes *)(p + 3 * w + l);
                }
                if (radix >= 8) {
                    a4 = *(lanes *)(p + 4 * w + l);
                    a5 = *(lanes *)(p + 5 * w + l);
                    a6 = *(lanes *)(p + 6 * w + l);
                    a7 = *(lanes *)(p + 7 * w + l);
                }
                if (use_signs) {
                    a0 *= s0;
                    if (radix >= 2) a1 *= s1;
                    if (radix >= 4) { a2 *= s2; a3 *= s3; }
                    if (radix >= 8) { a4 *= s4; a5 *= s5; a6 *= s6; a7 *= s7; }
                }
                if (radix >= 2) {
                    TQ_BUTTERFLY(lanes, a0, a1);
                    TQ_BUTTERFLY(lanes, a2, a3);
                    TQ_BUTTERFLY(lanes, a4, a5);
                    TQ_BUTTERFLY(lanes, a6, a7);
                }
                if (radix >= 4) {
                    TQ_BUTTERFLY(lanes, a0, a2);
                    TQ_BUTTERFLY(lanes, a1, a3);
                    TQ_BUTTERFLY(lanes, a4, a6);
                    TQ_BUTTERFLY(lanes, a5, a7);
                }
                if (radix >= 8) {
                    TQ_BUTTERFLY(lanes, a0, a4);
                    TQ_BUTTERFLY(lanes, a1, a5);
                    TQ_BUTTERFLY(lanes, a2, a6);
                    TQ_BUTTERFLY(lanes, a3, a7);
                }
                if (use_scale) {
                    a0 *= scale; a1 *= scale; a2 *= scale; a3 *= scale;
                    a4 *= scale; a5 *= scale; a6 *= scale; a7 *= scale;
                }
                *(lanes *)(p + l) = a0;
                if (radix >= 2) *(lanes *)(p + w + l) = a1;
                if (radix >= 4) {
                    *(lanes *)(p + 2 * w + l) = a2;
                    *(lanes *)(p + 3 * w + l) = a3;
                }
                if (radix >= 8) {
                    *(lanes *)(p + 4 * w + l) = a4;
                    *(lanes *)(p + 5 * w + l) = a5;
                    *(lanes *)(p + 6 * w + l) = a6;
                    *(lanes *)(p + 7 * w + l) = a7;
                }
            }
        }
    }
}

/* A pass of the given radix with the flags turned into constants, so that each
 * combination compiles without branches in the loop. */
TQ_INLINE void TQ_NAME(tq_pass_radix)(TQ_T *v, ptrdiff_t length, ptrdiff_t h, const int radix,
                                     const TQ_T *signs, TQ_T scale, int use_signs, int use_scale)
{
    if (use_signs && use_scale)
        TQ_NAME(tq_pass)(v, length, h, radix, signs, scale, 1, 1);
    else if (use_signs)
        TQ_NAME(tq_pass)(v, length, h, radix, signs, scale, 1, 0);
    else if (use_scale)
        TQ_NAME(tq_pass)(v, length, h, radix, signs, scale, 0, 1);
    else
        TQ_NAME(tq_pass)(v, length, h, radix, signs, scale, 0, 0);
}

/* Unnormalized Walsh-Hadamard transform of `length` (a power of two) tile rows
 * in radix-8 passes; the inputs are first multiplied by `signs` (unless NULL),
 * the outputs finally by `scale` (when use_scale). */
TQ_INLINE void TQ_NAME(tq_fwht)(TQ_T *v, ptrdiff_t length, const TQ_T *signs, TQ_T scale,
                               int use_scale)
{
    ptrdiff_t h = 1;
    do {
        const ptrdiff_t left = length / h;
        const int radix = left >= 8 ? 8 : (int)left;
        const int first = h == 1, last = h * radix == length;
        const int use_signs = first && signs != NULL, scaled = last && use_scale;
        if (radix == 8)
            TQ_NAME(tq_pass_radix)(v, length, h, 8, signs, scale, use_signs, scaled);
        else if (radix == 4)
            TQ_NAME(tq_pass_radix)(v, length, h, 4, signs, scale, use_signs, scaled);
        else if (radix == 2)
            TQ_NAME(tq_pass_radix)(v, length, h, 2, signs, scale, use_signs, scaled);
        else
            TQ_NAME(tq_pass_radix)(v, length, h, 1, signs, scale, use_signs, scaled);
        h *= radix;
    } while (h < length);
}

TQ_INLINE void TQ_NAME(tq_flip_signs)(TQ_T *v, const TQ_T *signs, ptrdiff_t coords)
{
    for (ptrdiff_t j = 0; j < coords; j++) {
        const TQ_T s = signs[j];
        for (int l = 0; l < TQ_TILE; l++)
            v[j * TQ_TILE + l] *= s;
    }
}

TQ_INLINE void TQ_NAME(tq_scale)(TQ_T *v, ptrdiff_t coords, TQ_T factor)
{
    for (ptrdiff_t k = 0; k < coords * TQ_TILE; k++)
        v[k] *= factor;
}

/* The randomized Hadamard rotation of a tile (see tq_hadamard.h): `rounds`
 * rounds of signs, H_block on the first block coordinates and, when block < d,
 * H_block on the last block coordinates, each of those scaled by `factor`; when
 * block == d the result is scaled by `final_scale` instead. With
 * `first_signed`, the first round's signs are already applied. */
TQ_INLINE void TQ_NAME(tq_rotate_forward)(TQ_T *v, const TQ_T *signs, ptrdiff_t rounds,
                                         ptrdiff_t d, ptrdiff_t block, TQ_T factor,
                                         TQ_T final_scale, int first_signed)
{
    for (ptrdiff_t r = 0; r < rounds; r++) {
        const TQ_T *s = (r == 0 && first_signed) ? NULL : signs + r * d;
        if (block < d) {
            if (s != NULL)
                TQ_NAME(tq_flip_signs)(v + block * TQ_TILE, s + block, d - block);
            TQ_NAME(tq_fwht)(v, block, s, factor, 1);
            TQ_NAME(tq_fwht)(v + (d - block) * TQ_TILE, block, NULL, factor, 1);
        } else {
            TQ_NAME(tq_fwht)(v, block, s, final_scale, r == rounds - 1);
        }
    }
}

/* The inverse rotation: the rounds' steps backwards. */
TQ_INLINE void TQ_NAME(tq_rotate_inverse)(TQ_T *v, const TQ_T *signs, ptrdiff_t rounds,
                                         ptrdiff_t d, ptrdiff_t block, TQ_T factor,
                                         TQ_T final_scale)
{
    for (ptrdiff_t r = rounds - 1; r >= 0; r--) {
        if (block < d) {
            TQ_NAME(tq_fwht)(v + (d - block) * TQ_TILE, block, NULL, factor, 1);
            TQ_NAME(tq_fwht)(v, block, NULL, factor, 1);
        } else {
            TQ_NAME(tq_fwht)(v, block, NULL, final_scale, 0);
        }
        TQ_NAME(tq_flip_signs)(v, signs + r * d, d);
    }
    if (block == d && rounds > 0)
        TQ_NAME(tq_scale)(v, d, final_scale);
}
