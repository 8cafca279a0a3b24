/* Transposed tiles of rows, and kernel variants for the running CPU's instruction sets.
 *
 * A kernel body is written once, as portable C that compilers vectorize across
 * the TQ_TILE rows of a transposed tile, and marked TQ_INLINE (helpers too), so
 * that TQ_DEFINE_VARIANTS can compile it several times: plainly (the portable
 * variant, the only one off x86 or with other compilers), and with the AVX2 and
 * the AVX-512 instruction sets. The caller picks a variant at run time
 * (tq_best_variant) and passes it down.
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

/* The fastest variant this CPU runs. */
static inline int tq_best_variant(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return TQ_AVX512;
    if (__builtin_cpu_supports("avx2"))
        return TQ_AVX2;
    return TQ_PORTABLE;
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

/* Names of the variants, by number (for introspection and tests). */
static inline const char *tq_variant_name(int variant)
{
    return variant == TQ_AVX512 ? "avx512" : variant == TQ_AVX2 ? "avx2" : "portable";
}

#endif /* TQ_TILE_H */
