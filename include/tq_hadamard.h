/* Randomized Hadamard rotation of rows.
 *
 * One round multiplies by the round's random signs, then applies the
 * orthonormal Walsh-Hadamard transform H_B (B a power of two, d/2 < B <= d) to
 * the first B coordinates and, when B < d, to the last B coordinates. The
 * inverse runs the steps backwards (each step is orthogonal and H_B is its own
 * inverse).
 *
 * Rows are rotated TQ_TILE at a time in a transposed tile (tq_tile.h), by
 * radix-8 butterfly passes that keep three stages in registers. The transform
 * is defined for float and double tiles (tq_fwht_f, tq_fwht_d, ...); the
 * rotation kernel below works in double for both input types.
 */
#ifndef TQ_HADAMARD_H
#define TQ_HADAMARD_H

#include <math.h>
#include <stddef.h>

#include "tq_tile.h"

#define TQ_NAME_(name, suffix) name##_##suffix
#define TQ_NAME__(name, suffix) TQ_NAME_(name, suffix)
#define TQ_NAME(name) TQ_NAME__(name, TQ_SUFFIX)
#define TQ_BODY(name) TQ_NAME__(TQ_NAME(name), body)

/* (a, b) <- (a + b, a - b) */
#define TQ_BUTTERFLY(type, a, b) \
    do {                         \
        const type lo_ = (a);    \
        (a) = lo_ + (b);         \
        (b) = lo_ - (b);         \
    } while (0)

#define TQ_T float
#define TQ_SUFFIX f
#include "tq_hadamard_typed.h"
#undef TQ_T
#undef TQ_SUFFIX
#define TQ_T double
#define TQ_SUFFIX d
#include "tq_hadamard_typed.h"
#undef TQ_T
#undef TQ_SUFFIX

TQ_DEFINE_LOAD(tq_load_double_f, float, double)
TQ_DEFINE_LOAD(tq_load_double_d, double, double)
TQ_DEFINE_STORE(tq_store_double_f, double, float)
TQ_DEFINE_STORE(tq_store_double_d, double, double)

/* Rotate rows 0 .. count - 1 (count <= TQ_TILE) of `x` into `out` (d
 * coordinates each), in double; `tile` is scratch of TQ_TILE * d doubles. */
#define TQ_DEFINE_ROTATE(name, in_t, load, store)                                          \
    TQ_INLINE void name##_body(int variant, const in_t *x, in_t *out, ptrdiff_t count,     \
                               ptrdiff_t d, const double *signs, ptrdiff_t rounds,         \
                               ptrdiff_t block, int inverse, double *tile)                 \
    {                                                                                      \
        const double factor = 1.0 / sqrt((double)block);                                   \
        const double final_scale = pow(factor, (double)rounds);                            \
        (void)variant;                                                                     \
        load(tile, x, count, d, 0, d);                                                     \
        if (inverse)                                                                       \
            tq_rotate_inverse_d(tile, signs, rounds, d, block, factor, final_scale);       \
        else                                                                               \
            tq_rotate_forward_d(tile, signs, rounds, d, block, factor, final_scale, 0);    \
        store(out, tile, count, d);                                                        \
    }                                                                                      \
    TQ_DEFINE_VARIANTS(name, (int variant, const in_t *x, in_t *out, ptrdiff_t count,      \
                              ptrdiff_t d, const double *signs, ptrdiff_t rounds,          \
                              ptrdiff_t block, int inverse, double *tile),                 \
                       (variant, x, out, count, d, signs, rounds, block, inverse, tile))

TQ_DEFINE_ROTATE(tq_hadamard_rotate_f, float, tq_load_double_f, tq_store_double_f)
TQ_DEFINE_ROTATE(tq_hadamard_rotate_d, double, tq_load_double_d, tq_store_double_d)

#endif /* TQ_HADAMARD_H */
