/* The one place turboquant talks to OpenMP.
 *
 * Every OpenMP query the kernels need goes through these inline functions, so
 * the same _core.pyx compiles with and without OpenMP (the stand-ins report a
 * single thread).
 */
#ifndef TQ_OPENMP_H
#define TQ_OPENMP_H

#ifdef _OPENMP
#include <omp.h>
static inline int tq_openmp_enabled(void) { return 1; }
static inline int tq_max_threads(void) { return omp_get_max_threads(); }
static inline int tq_num_procs(void) { return omp_get_num_procs(); }
static inline int tq_thread_num(void) { return omp_get_thread_num(); }
#else
static inline int tq_openmp_enabled(void) { return 0; }
static inline int tq_max_threads(void) { return 1; }
static inline int tq_num_procs(void) { return 1; }
static inline int tq_thread_num(void) { return 0; }
#endif

#endif /* TQ_OPENMP_H */
