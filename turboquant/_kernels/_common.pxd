# cython: language_level=3
# Declarations shared by the kernel modules: the C headers in include/, small
# inline helpers and, through ``cimport *``, the cimports below (not cython.parallel's
# prange and parallel, which each .pyx cimports itself). It has no module of its own.
from cython cimport floating
from libc.math cimport INFINITY, exp, log
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset


cdef extern from "tq_quantize.h" nogil:
    const int TQ_TILE
    const int TQ_CHUNK
    int tq_best_variant()
    const char* tq_variant_name(int variant)
    float tq_float_bound(double b)
    double tq_row_norm_f(const float* row, Py_ssize_t d)
    double tq_row_norm_d(const double* row, Py_ssize_t d)
    void tq_hadamard_rotate_f(int variant, const float* x, float* out, Py_ssize_t count,
                              Py_ssize_t d, const double* signs, Py_ssize_t rounds,
                              Py_ssize_t block, int inverse, double* tile)
    void tq_hadamard_rotate_d(int variant, const double* x, double* out, Py_ssize_t count,
                              Py_ssize_t d, const double* signs, Py_ssize_t rounds,
                              Py_ssize_t block, int inverse, double* tile)
    void tq_hadamard_quantize_f(int variant, const float* x, Py_ssize_t count, Py_ssize_t d,
                                const float* signs, Py_ssize_t rounds, Py_ssize_t block,
                                const float* bounds, int bits, const double* centroids,
                                double* norms, uint8_t* codes, Py_ssize_t row_bytes,
                                float* residual, float* tile)
    void tq_hadamard_quantize_d(int variant, const double* x, Py_ssize_t count, Py_ssize_t d,
                                const double* signs, Py_ssize_t rounds, Py_ssize_t block,
                                const double* bounds, int bits, const double* centroids,
                                double* norms, uint8_t* codes, Py_ssize_t row_bytes,
                                double* residual, double* tile)
    void tq_quantize_rows_f(int variant, const float* y, Py_ssize_t count, Py_ssize_t d,
                            const double* norms, const double* bounds, int bits,
                            const double* centroids, uint8_t* codes, Py_ssize_t row_bytes,
                            float* residual, double* tile)
    void tq_quantize_rows_d(int variant, const double* y, Py_ssize_t count, Py_ssize_t d,
                            const double* norms, const double* bounds, int bits,
                            const double* centroids, uint8_t* codes, Py_ssize_t row_bytes,
                            double* residual, double* tile)

cdef extern from "tq_matrix.h" nogil:
    void tq_small_product_f(int variant, const float* x, Py_ssize_t m, Py_ssize_t d,
                            const float* mat, float* out)
    void tq_small_product_d(int variant, const double* x, Py_ssize_t m, Py_ssize_t d,
                            const double* mat, double* out)

cdef extern from "tq_lut.h" nogil:
    enum:
        TQ_LUT_MAX_BITS
        TQ_LUT_MAX_QUERIES
    uint32_t tq_lut_index(const uint8_t* row, Py_ssize_t j, int bits, Py_ssize_t row_bytes)
    void tq_lut_scores(int variant, const uint8_t* codes, Py_ssize_t n, Py_ssize_t row_bytes, int bits,
                       const float* centroids, const float* queries, Py_ssize_t m, Py_ssize_t d,
                       const double* scales, float* out, Py_ssize_t out_stride, int accumulate,
                       float* high)
    void tq_lut_weighted_sum(int variant, const uint8_t* codes, Py_ssize_t n, Py_ssize_t row_bytes, int bits,
                             const float* centroids, const float* weights, Py_ssize_t weight_stride,
                             Py_ssize_t m, const double* scales, Py_ssize_t d, float* acc)
    double tq_exp_shifted(int variant, float* x, Py_ssize_t n, float shift)

cdef extern from "tq_block.h" nogil:
    void tq_block_scores(int variant, const uint8_t* codes, const uint8_t* block_codes, Py_ssize_t n,
                         Py_ssize_t row_bytes, Py_ssize_t block_bytes, int bits, const float* centroids,
                         const float* factors, const float* queries, Py_ssize_t m, Py_ssize_t d,
                         const double* scales, float* out, Py_ssize_t out_stride, int accumulate,
                         float* high)
    void tq_block_weighted_sum(int variant, const uint8_t* codes, const uint8_t* block_codes, Py_ssize_t n,
                               Py_ssize_t row_bytes, Py_ssize_t block_bytes, int bits,
                               const float* centroids, const float* factors, const float* weights,
                               Py_ssize_t weight_stride, Py_ssize_t m, const double* scales, Py_ssize_t d,
                               float* acc)

cdef extern from "tq_random.h" nogil:
    Py_ssize_t tq_standard_normal_from_raw(const uint64_t* words, Py_ssize_t n_words,
                                           double* out, Py_ssize_t n_out)
    void tq_haar_orthogonal(int variant, double* a, Py_ssize_t d, double* work)

cdef extern from "tq_openmp.h" nogil:
    int tq_openmp_enabled()
    int tq_max_threads()
    int tq_num_procs()
    int tq_thread_num()
    void tq_team_note()
    void tq_call_begin(int variant)
    int tq_last_team()
    int tq_last_variant()


# Below this many inner-loop steps a parallel region costs more than it saves
# (and on a busy machine far more): such calls run on one thread. Results never
# depend on the thread count, so this changes speed only.
cdef enum:
    MIN_PARALLEL_WORK = 1 << 16


cdef inline int threads_for(Py_ssize_t work, int n_threads) noexcept nogil:
    return 1 if work < MIN_PARALLEL_WORK else n_threads


# ---------------------------------------------------------------------------
# Bit-stream helpers
# ---------------------------------------------------------------------------

cdef inline uint32_t read_index(const uint8_t* row, Py_ssize_t j, int bits,
                                Py_ssize_t row_bytes) noexcept nogil:
    """Bits ``j*bits .. j*bits + bits - 1`` of a packed row (include/tq_lut.h)."""
    return tq_lut_index(row, j, bits, row_bytes)


cdef inline void write_index(uint8_t* row, Py_ssize_t j, int bits,
                             uint32_t value) noexcept nogil:
    """OR index ``j`` into a zeroed packed row."""
    cdef Py_ssize_t bit = j * bits
    cdef Py_ssize_t byte = bit >> 3
    cdef int shift = bit & 7
    row[byte] |= <uint8_t> ((value << shift) & 0xFFu)
    if shift + bits > 8:
        row[byte + 1] |= <uint8_t> (value >> (8 - shift))


# ---------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------

cdef inline double row_norm(const floating* row, Py_ssize_t d) noexcept nogil:
    if floating is float:
        return tq_row_norm_f(row, d)
    else:
        return tq_row_norm_d(row, d)

cdef extern from "tq_scan.h" nogil:
    enum:
        TQ_SCAN_BLOCK
    ctypedef struct tq_candidate:
        double key
        int64_t id
        int64_t position
    ctypedef struct tq_heap:
        tq_candidate* items
        Py_ssize_t size
        Py_ssize_t capacity
    Py_ssize_t tq_scan_nibbles(Py_ssize_t d, int bits)
    void tq_scan_pack(const uint8_t* rows, Py_ssize_t count, Py_ssize_t row_bytes, Py_ssize_t nibbles,
                      uint8_t* blocks, Py_ssize_t first)
    void tq_scan_unpack(const uint8_t* blocks, Py_ssize_t nibbles, const int64_t* positions,
                        Py_ssize_t count, Py_ssize_t row_bytes, uint8_t* rows)
    void tq_scan_tables(const float* query, Py_ssize_t d, int bits, const double* centroids,
                        Py_ssize_t nibbles, double* exact, uint8_t* table, double* delta, double* bias)
    double tq_scan_exact(const uint8_t* blocks, Py_ssize_t nibbles, Py_ssize_t position, const double* exact)
    void tq_heap_offer(tq_heap* heap, tq_candidate c)
    void tq_heap_offer_row(tq_heap* heap, double key, int64_t id, int64_t position)
    double tq_heap_threshold(const tq_heap* heap)
    void tq_heap_sort(tq_heap* heap)
    void tq_scan_blocks(int variant, const uint8_t* blocks, Py_ssize_t nibbles, Py_ssize_t n,
                        Py_ssize_t b0, Py_ssize_t b1, const uint8_t* tables, const double* delta,
                        const double* bias, Py_ssize_t m, const float* scale, const float* offset,
                        const float* block_terms, const int64_t* ids, tq_heap* heaps)
