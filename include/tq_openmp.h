/* The one place turboquant talks to OpenMP, and the record of the last kernel call.
 *
 * Every OpenMP query the kernels need goes through these inline functions, so
 * the same _core.pyx compiles with and without OpenMP (the stand-ins report a
 * single thread).
 *
 * Each calling thread also keeps, in thread-local variables, what its last
 * kernel call ran with: the kernel variant (tq_tile.h) and the largest team of
 * its parallel regions. A kernel starts with tq_call_begin; each parallel
 * region calls tq_team_note once per thread, and only its master (the calling
 * thread itself, or a team member for nested regions, which then writes its
 * own record) raises the size. Tests read the record to check that a call
 * really ran on several threads.
 */
#ifndef TQ_OPENMP_H
#define TQ_OPENMP_H

#if defined(_MSC_VER)
#define TQ_THREAD_LOCAL __declspec(thread)
#elif defined(__GNUC__) || defined(__clang__)
#define TQ_THREAD_LOCAL __thread
#else
#define TQ_THREAD_LOCAL _Thread_local
#endif

static TQ_THREAD_LOCAL int tq_last_team_ = 1;
static TQ_THREAD_LOCAL int tq_last_variant_ = -1;

#ifdef _OPENMP
#include <omp.h>
static inline int tq_openmp_enabled(void) { return 1; }
static inline int tq_max_threads(void) { return omp_get_max_threads(); }
static inline int tq_num_procs(void) { return omp_get_num_procs(); }
static inline int tq_thread_num(void) { return omp_get_thread_num(); }
static inline void tq_team_note(void)
{
    if (omp_get_thread_num() == 0 && omp_get_num_threads() > tq_last_team_)
        tq_last_team_ = omp_get_num_threads();
}
#else
static inline int tq_openmp_enabled(void) { return 0; }
static inline int tq_max_threads(void) { return 1; }
static inline int tq_num_procs(void) { return 1; }
static inline int tq_thread_num(void) { return 0; }
static inline void tq_team_note(void) {}
#endif

/* A kernel call on this thread starts: `variant` is the one it runs (-1 for
 * kernels with a single implementation); its team is 1 until a region notes more. */
static inline void tq_call_begin(int variant)
{
    tq_last_variant_ = variant;
    tq_last_team_ = 1;
}
static inline int tq_last_team(void) { return tq_last_team_; }
static inline int tq_last_variant(void) { return tq_last_variant_; }

#endif /* TQ_OPENMP_H */
