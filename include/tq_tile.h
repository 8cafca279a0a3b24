/* Transposed tiles of rows, and kernel variants for the running CPU's instruction sets.
 *
 * A kernel body is written once, as portable C that compilers vectorize across
 * the TQ_TILE rows of a transposed tile, and marked TQ_INLINE (helpers too), so
 * that TQ_DEFINE_VARIANTS can compile it several times: plainly (the portable
 * variant, the only one off x86 or with other compilers), and with the AVX2 and
 * the AVX-512 instruction sets. The caller picks a variant at run time
 * (tq_best_variant, probed once per process) and passes it down explicitly.
 *
 * Every variant performs the same IEEE additions, subtractions, multiplications
 * and comparisons in the same order, and setup.py builds with
 * -ffp-contract=off (the AVX-512 set includes FMA), so all of them give
 * bit-identical results.
 */
#ifndef TQ_TILE_H
#define TQ_TILE_H

#include <stddef.h>

/* Rows per transposed tile: tile[j * TQ_TILE + lane] is coordinate j of row
 * `lane`. Every lane goes through the same arithmetic, in the same order, as a
 * single row would, so results do not depend on which rows share a tile. */
#define TQ_TILE 16

#if defined(__GNUC__) || defined(__clang__)
#define TQ_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define TQ_INLINE static __forceinline
#else
#define TQ_INLINE static inline
#endif

enum { TQ_PORTABLE = 0, TQ_AVX2 = 1, TQ_AVX512 = 2 };

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define TQ_X86_VARIANTS 1
#define TQ_AVX2_TARGET __attribute__((target("avx2")))
#define TQ_AVX512_TARGET __attribute__((target("avx2,avx512f,avx512bw,avx512dq,avx512vl")))

/* The fastest variant this CPU runs: the only CPU probe of the package, made
 * once when the extension module is initialised (_dispatch.pxi). The AVX2 and
 * AVX-512 variants both require FMA as well (tq_lut.h uses it). */
static inline int tq_best_variant(void)
{
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        return TQ_PORTABLE;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return TQ_AVX512;
    return TQ_AVX2;
}

/* `name(params)` calls `name##_body(args)` compiled for the variant named by
 * the parameter `variant` (which params must include, first). */
#define TQ_DEFINE_VARIANTS(name, params, args)                                   \
    static void name##_portable params { name##_body args; }                     \
    TQ_AVX2_TARGET static void name##_avx2 params { name##_body args; }          \
    TQ_AVX512_TARGET static void name##_avx512 params { name##_body args; }      \
    static void name params                                                      \
    {                                                                            \
        if (variant == TQ_AVX512)                                                \
            name##_avx512 args;                                                  \
        else if (variant == TQ_AVX2)                                             \
            name##_avx2 args;                                                    \
        else                                                                     \
            name##_portable args;                                                \
    }
#else
static inline int tq_best_variant(void) { return TQ_PORTABLE; }
#define TQ_DEFINE_VARIANTS(name, params, args) \
    static void name params { name##_body args; }
#endif

/* GCC and clang spell a whole tile row as one vector value (TQ_LANES(type)),
 * which they lower to the widest registers of each variant; elsewhere a tile
 * row is processed one lane at a time. Loops over lanes step by TQ_LANE_STEP. */
#if defined(__GNUC__) || defined(__clang__)
#define TQ_LANES(type) type __attribute__((vector_size(TQ_TILE * sizeof(type)), aligned(sizeof(type)), may_alias))
#define TQ_LANE_STEP TQ_TILE
#else
#define TQ_LANES(type) type
#define TQ_LANE_STEP 1
#endif

#if defined(__GNUC__) && !defined(__clang__)
#define TQ_IVDEP _Pragma("GCC ivdep")
#elif defined(__clang__)
#define TQ_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define TQ_IVDEP
#endif

/* Rows first .. first + count - 1 (count <= TQ_TILE) of the (n, d) array `in`,
 * coordinates [j0, j1), into tile[(j - j0) * TQ_TILE + lane], converted to the
 * tile's type; lanes from count on are zero. */
#define TQ_DEFINE_LOAD(name, in_t, tile_t)                                            \
    TQ_INLINE void name(tile_t *tile, const in_t *in, ptrdiff_t count, ptrdiff_t d,   \
                        ptrdiff_t j0, ptrdiff_t j1)                                   \
    {                                                                                 \
        for (ptrdiff_t l = 0; l < count; l++)                                         \
            for (ptrdiff_t j = j0; j < j1; j++)                                       \
                tile[(j - j0) * TQ_TILE + l] = (tile_t)in[l * d + j];                 \
        for (ptrdiff_t l = count; l < TQ_TILE; l++)                                   \
            for (ptrdiff_t j = j0; j < j1; j++)                                       \
                tile[(j - j0) * TQ_TILE + l] = 0;                                     \
    }

/* The inverse of a load: lanes 0 .. count - 1 back into rows of `out`. */
#define TQ_DEFINE_STORE(name, tile_t, out_t)                                          \
    TQ_INLINE void name(out_t *out, const tile_t *tile, ptrdiff_t count, ptrdiff_t d) \
    {                                                                                 \
        for (ptrdiff_t l = 0; l < count; l++)                                         \
            for (ptrdiff_t j = 0; j < d; j++)                                         \
                out[l * d + j] = (out_t)tile[j * TQ_TILE + l];                        \
    }

/* A full tile of float rows, coordinates [j0, j0 + 16), loaded as sixteen
 * vectors and transposed in registers (four rounds of two-vector shuffles, each
 * swapping one bit of the row index with the same bit of the column index). */
#if defined(__has_builtin) && TQ_TILE == 16 && TQ_LANE_STEP == TQ_TILE
#if __has_builtin(__builtin_shufflevector)
#define TQ_HAVE_TRANSPOSE16 1
typedef TQ_LANES(float) tq_lanes16_f;

#define TQ_SWAP_BITS(r, t, k, ...)                                                   \
    for (int i_ = 0; i_ < 16; i_++)                                                  \
        if (!(i_ & (k)))                                                             \
            TQ_SWAP_PAIR(r[i_], r[i_ + (k)], t[i_], t[i_ + (k)], __VA_ARGS__)
#define TQ_SWAP_PAIR(a, b, lo, hi, ...) TQ_SWAP_PAIR_(a, b, lo, hi, __VA_ARGS__)
#define TQ_SWAP_PAIR_(a, b, lo, hi, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11,   \
                      l12, l13, l14, l15, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, \
                      h11, h12, h13, h14, h15)                                         \
    {                                                                                  \
        lo = __builtin_shufflevector(a, b, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9,    \
                                     l10, l11, l12, l13, l14, l15);                    \
        hi = __builtin_shufflevector(a, b, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9,    \
                                     h10, h11, h12, h13, h14, h15);                    \
    }

TQ_INLINE void tq_transpose16_f(float *tile, const float *x, ptrdiff_t d)
{
    tq_lanes16_f r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = *(const tq_lanes16_f *)(x + i * d);
    TQ_SWAP_BITS(r, t, 1, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30,
                 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    TQ_SWAP_BITS(t, r, 2, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29,
                 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    TQ_SWAP_BITS(r, t, 4, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27,
                 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    TQ_SWAP_BITS(t, r, 8, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23,
                 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 16; i++)
        *(tq_lanes16_f *)(tile + i * TQ_TILE) = r[i];
}
#endif
#endif

/* Names of the variants, by number (for introspection and tests). */
static inline const char *tq_variant_name(int variant)
{
    return variant == TQ_AVX512 ? "avx512" : variant == TQ_AVX2 ? "avx2" : "portable";
}

#endif /* TQ_TILE_H */
