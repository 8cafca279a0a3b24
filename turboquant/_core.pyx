# cython: language_level=3
"""Typed kernels behind turboquant.

Every function here takes C-contiguous typed memoryviews that the Python layer
has already validated and allocated, and an explicit ``n_threads`` (>= 1). The
kernels know nothing about quantizers, caches or configs: they hold the loops.

Bit layout used throughout: a row of ``dim`` indices of ``bits`` bits each is a
little-endian bit stream; index ``j`` occupies bits ``j*bits .. j*bits+bits-1``
(bit 0 is the least significant bit of byte 0), so a row takes exactly
``ceil(dim*bits/8)`` bytes. Sign sketches are the ``bits == 1`` case
(bit set = +1), which matches ``numpy.packbits(..., bitorder="little")``.
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
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

cdef extern from "tq_openmp.h" nogil:
    int tq_openmp_enabled()
    int tq_max_threads()
    int tq_num_procs()
    int tq_thread_num()


def openmp_enabled():
    """Return True when the extension was compiled with OpenMP."""
    return bool(tq_openmp_enabled())


def max_threads():
    """Return the OpenMP default team size (follows ``OMP_NUM_THREADS``); 1 without OpenMP."""
    return tq_max_threads()


def num_procs():
    """Return the number of processors OpenMP sees; 1 without OpenMP."""
    return tq_num_procs()


# Kernel variants (portable C, AVX2, AVX-512; see include/tq_tile.h): all give
# bit-identical results, so the choice changes speed only.
cdef int BEST_VARIANT = tq_best_variant()
cdef int kernel_variant = BEST_VARIANT


def _kernel_variants():
    """Names of the kernel variants this CPU can run, the portable C one first."""
    return [tq_variant_name(v).decode() for v in range(BEST_VARIANT + 1)]


def _kernel_variant():
    """Name of the kernel variant in use (the fastest by default)."""
    return tq_variant_name(kernel_variant).decode()


def _set_kernel_variant(name):
    """Use the kernel variant ``name`` (one of :func:`_kernel_variants`); for tests.

    Not thread-safe: set it while no kernel runs.
    """
    global kernel_variant
    names = _kernel_variants()
    if name not in names:
        raise ValueError(f"kernel variant must be one of {names}, got {name!r}")
    kernel_variant = names.index(name)


# Below this many inner-loop steps a parallel region costs more than it saves
# (and on a busy machine far more): such calls run on one thread. Results never
# depend on the thread count, so this changes speed only.
DEF MIN_PARALLEL_WORK = 1 << 16


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


def row_norms(const floating[:, ::1] x, double[::1] out, int n_threads):
    """Euclidean norm of every row, in double, without overflow or underflow.

    One pass of squares in double; rows whose sum leaves the safe range of
    double (only possible for float64 input) are redone with scaling.

    Parameters
    ----------
    x : (n, d) float32 or float64, C-contiguous
    out : (n,) float64, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], i
    for i in prange(n, nogil=True, num_threads=threads_for(n * d, n_threads), schedule="static"):
        out[i] = row_norm(&x[i, 0], d)


# ---------------------------------------------------------------------------
# Randomized Hadamard rotation and quantization (include/tq_quantize.h)
# ---------------------------------------------------------------------------

cdef inline void* scratch_start(void* block) noexcept nogil:
    """First 64-byte aligned address of a block allocated with 64 spare bytes."""
    return <void*> ((<uintptr_t> block + 63) & ~(<uintptr_t> 63))


def hadamard_rotate(const floating[:, ::1] x, floating[:, ::1] out,
                    const double[:, ::1] signs, Py_ssize_t block, bint inverse,
                    int n_threads):
    """Apply the randomized Hadamard rotation (or its inverse) to every row.

    Each round multiplies by the round's random signs, then applies an
    orthonormal Walsh-Hadamard transform of size ``block`` (the largest power of
    two <= d) to the first ``block`` coordinates and, when ``block < d``, to the
    last ``block`` coordinates. Every step is orthogonal, so the inverse runs the
    steps backwards. Arithmetic is in double for both dtypes.

    Parameters
    ----------
    x, out : (n, d) float32 or float64, C-contiguous (may not alias)
    signs : (rounds, d) float64 of +-1
    block : power of two with d/2 < block <= d
    inverse : bool
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], rounds = signs.shape[0]
    cdef Py_ssize_t n_tiles = (n + TQ_TILE - 1) // TQ_TILE, t, first, count
    cdef int team = threads_for(n * d, min(<Py_ssize_t> n_threads, n_tiles))
    cdef int variant = kernel_variant
    cdef double* tile
    # One transposed tile of TQ_TILE rows per thread, indexed by the OpenMP thread number.
    # Tiles are independent, so they are handed out "guided" (big shares first, then
    # smaller ones to whichever thread is free): a thread whose core is busy with
    # something else (a spinning BLAS worker) does less instead of holding up the call.
    cdef void* scratch = malloc(team * TQ_TILE * d * sizeof(double) + 64)
    if scratch == NULL:
        raise MemoryError()
    try:
        for t in prange(n_tiles, nogil=True, num_threads=team, schedule="guided"):
            tile = <double*> scratch_start(scratch) + tq_thread_num() * TQ_TILE * d
            first = t * TQ_TILE
            count = min(<Py_ssize_t> TQ_TILE, n - first)
            if floating is float:
                tq_hadamard_rotate_f(variant, &x[first, 0], &out[first, 0], count, d,
                                     &signs[0, 0], rounds, block, inverse, tile)
            else:
                tq_hadamard_rotate_d(variant, &x[first, 0], &out[first, 0], count, d,
                                     &signs[0, 0], rounds, block, inverse, tile)
    finally:
        free(scratch)


cdef int quantize_rows(const floating* y, Py_ssize_t n, Py_ssize_t d, const double* norms,
                       const double* boundaries, int bits, const double* centroids, uint8_t* codes,
                       Py_ssize_t row_bytes, floating* residual, int team) noexcept nogil:
    """The body of :func:`quantize_pack` on raw pointers (C-contiguous rows,
    ``residual`` NULL for none), tiles over a team of ``team`` threads. Returns -1
    when out of memory, else 0."""
    cdef Py_ssize_t n_tiles = (n + TQ_TILE - 1) // TQ_TILE, t, first, count
    cdef Py_ssize_t tile_size = TQ_TILE * min(d, <Py_ssize_t> TQ_CHUNK)
    cdef int variant = kernel_variant
    cdef double* tile
    cdef floating* res
    cdef void* scratch = malloc(team * tile_size * sizeof(double) + 64)
    if scratch == NULL:
        return -1
    for t in prange(n_tiles, num_threads=team, schedule="guided"):
        tile = <double*> scratch_start(scratch) + tq_thread_num() * tile_size
        first = t * TQ_TILE
        count = min(<Py_ssize_t> TQ_TILE, n - first)
        res = residual + first * d if residual != NULL else NULL
        if floating is float:
            tq_quantize_rows_f(variant, y + first * d, count, d, norms + first, boundaries, bits,
                               centroids, codes + first * row_bytes, row_bytes, res, tile)
        else:
            tq_quantize_rows_d(variant, y + first * d, count, d, norms + first, boundaries, bits,
                               centroids, codes + first * row_bytes, row_bytes, res, tile)
    free(scratch)
    return 0


def quantize_pack(const floating[:, ::1] y, const double[::1] norms,
                  const double[::1] boundaries, const double[::1] centroids, int bits,
                  uint8_t[:, ::1] codes, floating[:, ::1] residual, bint want_residual,
                  int n_threads):
    """Quantize ``y[i] / norms[i]`` coordinate-wise and bit-pack the cell indices.

    The index of a value ``u`` (computed in double for both dtypes) is the
    number of boundaries strictly below it. Rows with norm 0 are quantized as
    the zero vector.

    Parameters
    ----------
    y : (n, d) float32 or float64, rotated rows
    norms : (n,) float64
    boundaries : (2**bits - 1,) float64, increasing
    centroids : (2**bits,) float64 (read only when ``want_residual``)
    bits : int in 1..8
    codes : (n, ceil(d*bits/8)) uint8, written
    residual : (n, d) same dtype as ``y``; when ``want_residual`` it receives
        ``y[i]/norms[i] - centroids[index]``
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = y.shape[0], d = y.shape[1]
    cdef int status
    if n == 0:
        return
    with nogil:
        status = quantize_rows(&y[0, 0], n, d, &norms[0], &boundaries[0], bits, &centroids[0],
                               &codes[0, 0], codes.shape[1], &residual[0, 0] if want_residual else NULL,
                               threads_for(n * d, min(<Py_ssize_t> n_threads, (n + TQ_TILE - 1) // TQ_TILE)))
    if status < 0:
        raise MemoryError()


def small_dense_quantize_pack(const floating[:, ::1] x, const floating[:, ::1] operand,
                              const double[::1] boundaries, const double[::1] centroids, int bits,
                              double[::1] norms, uint8_t[:, ::1] codes, floating[:, ::1] residual,
                              bint want_residual):
    """:func:`row_norms`, :func:`small_product` and :func:`quantize_pack` in one call.

    For the few rows a dense rotation multiplies without BLAS (``x @ operand``
    with the rotation's small-product operand): the same bits as the three calls
    in turn, single-threaded, without their separate Python round trips.

    Parameters
    ----------
    x : (n, d) float32 or float64
    operand : (d, d), same dtype
    boundaries, centroids, bits, codes, residual, want_residual : as :func:`quantize_pack`
    norms : (n,) float64, written
    """
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], i
    cdef int status = 0
    cdef floating* rotated
    if operand.shape[0] != d or operand.shape[1] != d:
        raise ValueError(f"operand must be ({d}, {d}), got ({operand.shape[0]}, {operand.shape[1]})")
    if n == 0:
        return
    rotated = <floating*> malloc(n * d * sizeof(floating))
    if rotated == NULL:
        raise MemoryError()
    with nogil:
        for i in range(n):
            norms[i] = row_norm(&x[i, 0], d)
        if floating is float:
            tq_small_product_f(kernel_variant, &x[0, 0], n, d, &operand[0, 0], rotated)
        else:
            tq_small_product_d(kernel_variant, &x[0, 0], n, d, &operand[0, 0], rotated)
        status = quantize_rows(rotated, n, d, &norms[0], &boundaries[0], bits, &centroids[0],
                               &codes[0, 0], codes.shape[1], &residual[0, 0] if want_residual else NULL, 1)
    free(rotated)
    if status < 0:
        raise MemoryError()


def hadamard_quantize_pack(const floating[:, ::1] x, const double[:, ::1] signs,
                           Py_ssize_t block, const double[::1] boundaries,
                           const double[::1] centroids, int bits, double[::1] norms,
                           uint8_t[:, ::1] codes, floating[:, ::1] residual,
                           bint want_residual, int n_threads):
    """Norms, randomized Hadamard rotation and quantization of every row in one pass.

    float64 rows give the results of :func:`row_norms`, :func:`hadamard_rotate`
    and :func:`quantize_pack` in turn (without the intermediate rotated array).
    float32 rows are computed in float32: each row is divided by its norm
    (summed in double, as :func:`row_norms` does), rotated, and compared with the
    boundaries exactly; so cells differ from the float64 computation only at
    near-ties, and norms not at all.

    Parameters
    ----------
    x : (n, d) float32 or float64
    signs, block : as for :func:`hadamard_rotate`
    boundaries, centroids, bits, codes, residual, want_residual : as for :func:`quantize_pack`
    norms : (n,) float64, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], rounds = signs.shape[0]
    cdef Py_ssize_t row_bytes = codes.shape[1], n_tiles = (n + TQ_TILE - 1) // TQ_TILE
    cdef Py_ssize_t n_bounds = boundaries.shape[0], t, first, count, k
    cdef int team = threads_for(n * d, min(<Py_ssize_t> n_threads, n_tiles))
    cdef int variant = kernel_variant
    cdef floating* tile
    cdef floating* res
    cdef const floating* signs_t
    cdef const floating* bounds_t
    # Per thread a transposed tile of TQ_TILE rows; for float32 also the signs
    # and the boundaries rounded down to float32 (tq_float_bound).
    cdef void* scratch = malloc(team * TQ_TILE * d * sizeof(floating) + 64)
    cdef float* signs32 = <float*> malloc(rounds * d * sizeof(float) + n_bounds * sizeof(float))
    if scratch == NULL or signs32 == NULL:
        free(scratch)
        free(signs32)
        raise MemoryError()
    try:
        if floating is float:
            for k in range(rounds * d):
                signs32[k] = <float> (&signs[0, 0])[k]
            for k in range(n_bounds):
                signs32[rounds * d + k] = tq_float_bound(boundaries[k])
            signs_t = signs32
            bounds_t = signs32 + rounds * d
        else:
            signs_t = &signs[0, 0]
            bounds_t = &boundaries[0]
        for t in prange(n_tiles, nogil=True, num_threads=team, schedule="guided"):
            tile = <floating*> scratch_start(scratch) + tq_thread_num() * TQ_TILE * d
            first = t * TQ_TILE
            count = min(<Py_ssize_t> TQ_TILE, n - first)
            res = &residual[first, 0] if want_residual else NULL
            if floating is float:
                tq_hadamard_quantize_f(variant, &x[first, 0], count, d, signs_t, rounds, block,
                                       bounds_t, bits, &centroids[0], &norms[first],
                                       &codes[first, 0], row_bytes, res, tile)
            else:
                tq_hadamard_quantize_d(variant, &x[first, 0], count, d, signs_t, rounds, block,
                                       bounds_t, bits, &centroids[0], &norms[first],
                                       &codes[first, 0], row_bytes, res, tile)
    finally:
        free(scratch)
        free(signs32)


# ---------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------

def unpack_indices(const uint8_t[:, ::1] codes, int bits, uint8_t[:, ::1] out,
                   int n_threads):
    """Unpack bit-packed indices into one uint8 per index.

    Parameters
    ----------
    codes : (n, ceil(d*bits/8)) uint8
    bits : int in 1..8
    out : (n, d) uint8, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = out.shape[0], d = out.shape[1], row_bytes = codes.shape[1]
    cdef Py_ssize_t i, j
    for i in prange(n, nogil=True, num_threads=threads_for(n * d, n_threads), schedule="static"):
        for j in range(d):
            out[i, j] = <uint8_t> read_index(&codes[i, 0], j, bits, row_bytes)


def pack_indices(const uint8_t[:, ::1] indices, int bits, uint8_t[:, ::1] codes,
                 int n_threads):
    """Bit-pack one-uint8-per-index rows (values must be < 2**bits).

    Parameters
    ----------
    indices : (n, d) uint8
    bits : int in 1..8
    codes : (n, ceil(d*bits/8)) uint8, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = indices.shape[0], d = indices.shape[1], row_bytes = codes.shape[1]
    cdef Py_ssize_t i, j
    cdef uint8_t* row
    for i in prange(n, nogil=True, num_threads=threads_for(n * d, n_threads), schedule="static"):
        row = &codes[i, 0]
        memset(row, 0, row_bytes)
        for j in range(d):
            write_index(row, j, bits, indices[i, j])


def dequantize_rows(const uint8_t[:, ::1] codes, int bits, const double[::1] centroids,
                    const double[::1] scales, floating[:, ::1] out, int n_threads):
    """``out[i, j] = scales[i] * centroids[index(i, j)]``.

    Parameters
    ----------
    codes : (n, ceil(d*bits/8)) uint8
    bits : int in 1..8
    centroids : (2**bits,) float64
    scales : (n,) float64
    out : (n, d) float32 or float64, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = out.shape[0], d = out.shape[1], row_bytes = codes.shape[1]
    cdef Py_ssize_t i, j
    for i in prange(n, nogil=True, num_threads=threads_for(n * d, n_threads), schedule="static"):
        for j in range(d):
            out[i, j] = <floating> (
                scales[i] * centroids[read_index(&codes[i, 0], j, bits, row_bytes)])


# ---------------------------------------------------------------------------
# Lookup-table scoring
# ---------------------------------------------------------------------------

cdef inline bint byte_aligned(int bits) noexcept nogil:
    return bits == 1 or bits == 2 or bits == 4 or bits == 8


# Table scoring reads a code row as "slots": groups of consecutive indices
# whose bits are contiguous in the stream, looked up together. With 1, 2, 4 or 8
# bits a slot is a byte; with 3 bits, two indices (6 bits, 64 entries); with 5,
# 6 or 7 bits, one index.

cdef inline int slot_bits(int bits) noexcept nogil:
    if byte_aligned(bits):
        return 8
    return 6 if bits == 3 else bits


cdef inline Py_ssize_t table_slots(Py_ssize_t d, int bits) noexcept nogil:
    cdef Py_ssize_t per_slot = slot_bits(bits) // bits
    return (d + per_slot - 1) // per_slot


cdef inline void build_table(const floating* query, Py_ssize_t d, int bits,
                             const double* centroids, double* table) noexcept nogil:
    """Lookup table of one query: ``table[s * 2**slot_bits + v]`` is the
    contribution of slot ``s`` holding the bits ``v``."""
    cdef int width = slot_bits(bits), per_slot = width // bits, k
    cdef Py_ssize_t stride = (<Py_ssize_t> 1) << width, slots = table_slots(d, bits), r, j, v
    cdef uint32_t mask = (1u << bits) - 1u
    cdef double acc
    for r in range(slots):
        for v in range(stride):
            acc = 0.0
            for k in range(per_slot):
                j = r * per_slot + k
                if j < d:
                    acc = acc + query[j] * centroids[(v >> (k * bits)) & mask]
            table[r * stride + v] = acc


cdef inline double score_row(const uint8_t* row, const double* table, Py_ssize_t d,
                             int bits, Py_ssize_t row_bytes) noexcept nogil:
    """Sum of one code row's table entries. Four accumulators in a fixed order
    break the chain of dependent additions; the result is the same on every run."""
    cdef int width = slot_bits(bits)
    cdef Py_ssize_t stride = (<Py_ssize_t> 1) << width, count = table_slots(d, bits), r
    cdef Py_ssize_t tail = count - count % 4, per_group, groups, g, base
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0
    cdef uint64_t word, mask
    if width == 8:
        for r in range(0, tail, 4):
            a0 += table[r * 256 + row[r]]
            a1 += table[(r + 1) * 256 + row[r + 1]]
            a2 += table[(r + 2) * 256 + row[r + 2]]
            a3 += table[(r + 3) * 256 + row[r + 3]]
        for r in range(tail, count):
            a0 += table[r * 256 + row[r]]
    else:
        # Eight indices fill exactly ``bits`` bytes, so slots repeat with that
        # period: read each group of ``bits`` bytes as one little-endian word
        # and cut its 4 (3 bits) or 8 slots with fixed shifts.
        per_group = (8 * bits) // width
        groups = d // 8
        mask = (1u << width) - 1u
        if bits == 3:
            # The common case spelled out with constant shifts (64-entry pair tables).
            for g in range(groups):
                word = row[3 * g] | (<uint64_t> row[3 * g + 1] << 8) | (<uint64_t> row[3 * g + 2] << 16)
                base = 4 * g * 64
                a0 += table[base + (word & 63)]
                a1 += table[base + 64 + ((word >> 6) & 63)]
                a2 += table[base + 128 + ((word >> 12) & 63)]
                a3 += table[base + 192 + ((word >> 18) & 63)]
        else:
            for g in range(groups):
                word = 0
                for r in range(bits):
                    word |= (<uint64_t> row[g * bits + r]) << (8 * r)
                base = g * per_group
                for r in range(0, per_group, 4):
                    a0 += table[(base + r) * stride + ((word >> (r * width)) & mask)]
                    a1 += table[(base + r + 1) * stride + ((word >> ((r + 1) * width)) & mask)]
                    a2 += table[(base + r + 2) * stride + ((word >> ((r + 2) * width)) & mask)]
                    a3 += table[(base + r + 3) * stride + ((word >> ((r + 3) * width)) & mask)]
        for r in range(groups * per_group, count):
            a0 += table[r * stride + read_index(row, r, width, row_bytes)]
    return (a0 + a1) + (a2 + a3)


# Rows per call of the float32 small-code kernels (and per parallel work item).
# Their parallel loops hand chunks out dynamically: a thread whose core is shared
# (with OpenBLAS's spinning workers, say) takes fewer, instead of holding the
# others up. Chunk results are combined in chunk order, so which thread did
# which chunk never shows in the result.
DEF SMALL_CODE_ROWS = 256
# The small-code kernels read about a code byte per nanosecond per thread: below
# this many bytes (m queries x n rows x row bytes) waking a second thread costs
# more than it saves.
DEF MIN_PARALLEL_CODE_BYTES = 1 << 20


cdef inline int threads_for_codes(Py_ssize_t code_bytes, Py_ssize_t n_threads) noexcept nogil:
    return 1 if code_bytes < MIN_PARALLEL_CODE_BYTES else <int> n_threads


cdef inline void centroids_f32(const double[::1] centroids, int bits, float* out) noexcept nogil:
    cdef int k
    for k in range(1 << bits):
        out[k] = <float> centroids[k]


cdef void small_code_scores(const uint8_t[:, ::1] codes, int bits, const double[::1] centroids,
                            const float[:, ::1] queries, const double[::1] scales,
                            float[:, ::1] out, bint accumulate, int n_threads) noexcept nogil:
    """float32 scores of codes with at most TQ_LUT_MAX_BITS bits (include/tq_lut.h):
    rows in chunks of SMALL_CODE_ROWS, up to TQ_LUT_MAX_QUERIES queries per pass."""
    cdef Py_ssize_t m = queries.shape[0], d = queries.shape[1]
    cdef Py_ssize_t n = codes.shape[0], row_bytes = codes.shape[1]
    cdef Py_ssize_t n_chunks = (n + SMALL_CODE_ROWS - 1) // SMALL_CODE_ROWS, c, start, q0
    cdef int variant = kernel_variant
    cdef float cents[16]
    centroids_f32(centroids, bits, cents)
    for c in prange(n_chunks, num_threads=threads_for_codes(n * m * row_bytes, min(<Py_ssize_t> n_threads, n_chunks)),
                    schedule="dynamic"):
        start = c * SMALL_CODE_ROWS
        q0 = 0
        while q0 < m:
            tq_lut_scores(variant, &codes[start, 0], min(<Py_ssize_t> SMALL_CODE_ROWS, n - start), row_bytes, bits,
                          cents, &queries[q0, 0], min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, m - q0), d,
                          &scales[start], &out[q0, start], n, accumulate, NULL)
            q0 = q0 + TQ_LUT_MAX_QUERIES


def lut_inner_products(const uint8_t[:, ::1] codes, int bits, const double[::1] centroids,
                       const floating[:, ::1] queries, const double[::1] scales,
                       floating[:, ::1] out, bint accumulate, int n_threads):
    """Inner products of queries with packed codes, without dequantizing.

    ``out[q, i] (+)= scales[i] * sum_j queries[q, j] * centroids[index(i, j)]``.

    float32 queries with 1 to 4 bits are scored in float32 by the vectorized
    decoder of ``include/tq_lut.h`` (centroids rounded to float32). Otherwise
    a lookup table per query is indexed by whole bytes for 1, 2, 4 and 8 bits,
    by pairs of indices for 3 bits and by single indices for 5, 6 and 7 bits,
    and sums are accumulated in double. Either way the order of the additions
    is fixed, so results do not depend on the thread count.

    Parameters
    ----------
    codes : (n, ceil(d*bits/8)) uint8
    bits : int in 1..8
    centroids : (2**bits,) float64
    queries : (m, d) float32 or float64 (already in the codes' rotated domain)
    scales : (n,) float64
    out : (m, n), same dtype as ``queries``; overwritten, or added to when
        ``accumulate``
    n_threads : int >= 1
    """
    cdef Py_ssize_t m = queries.shape[0], d = queries.shape[1]
    cdef Py_ssize_t n = codes.shape[0], row_bytes = codes.shape[1]
    cdef Py_ssize_t table_size = table_slots(d, bits) << slot_bits(bits), q0, qn, q, i
    # Queries per pass over the codes: as many tables as fit in about 2 MiB.
    cdef Py_ssize_t block = max(1, min(16, (2 << 20) // (table_size * <Py_ssize_t> sizeof(double))))
    cdef double value
    cdef double* tables
    if n == 0 or m == 0:
        return
    if floating is float:
        if bits <= TQ_LUT_MAX_BITS:
            small_code_scores(codes, bits, centroids, queries, scales, out, accumulate, n_threads)
            return
    tables = <double*> malloc(block * table_size * sizeof(double))
    if tables == NULL:
        raise MemoryError()
    try:
        with nogil:
            q0 = 0
            while q0 < m:
                qn = min(block, m - q0)
                for q in prange(qn, num_threads=threads_for(qn * table_size, min(n_threads, qn)),
                                schedule="static"):
                    build_table(&queries[q0 + q, 0], d, bits, &centroids[0], tables + q * table_size)
                for i in prange(n, num_threads=threads_for(n * table_slots(d, bits) * qn, n_threads),
                                schedule="static"):
                    for q in range(qn):
                        value = scales[i] * score_row(&codes[i, 0], tables + q * table_size, d, bits, row_bytes)
                        if accumulate:
                            out[q0 + q, i] = <floating> (out[q0 + q, i] + value)
                        else:
                            out[q0 + q, i] = <floating> value
                q0 += qn
    finally:
        free(tables)


# ---------------------------------------------------------------------------
# Weighted sums of codes (attention output)
# ---------------------------------------------------------------------------

cdef inline bint use_histogram(int bits, Py_ssize_t tokens, Py_ssize_t d,
                               Py_ssize_t row_bytes) noexcept nogil:
    """Whether a chunk of ``tokens`` is summed through a per-byte weight histogram
    (one add per code byte, then ``256 * d`` to project) rather than one
    multiply-add per coordinate. Depends on sizes only, never on threads."""
    return byte_aligned(bits) and tokens * (d - row_bytes) > 256 * d


cdef inline void accumulate_chunk(const uint8_t[:, ::1] codes, int bits,
                                  const double* centroids, const floating[:, ::1] weights,
                                  const double[::1] scales, Py_ssize_t q_start, Py_ssize_t q_count,
                                  Py_ssize_t start, Py_ssize_t stop, Py_ssize_t d,
                                  double* histogram, double* partial) noexcept nogil:
    """Sum ``weights[q, i] * scales[i] * centroids[index(i, :)]`` over tokens
    ``start..stop`` into ``partial[q - q_start, :]`` for ``q_count`` queries."""
    cdef Py_ssize_t row_bytes = codes.shape[1], i, j, q, r, v
    cdef int per_byte, k
    cdef uint32_t mask = (1u << bits) - 1u
    cdef double w, total
    cdef double* acc
    cdef const uint8_t* row
    if use_histogram(bits, stop - start, d, row_bytes):
        per_byte = 8 // bits
        for q in range(q_count):
            memset(histogram, 0, row_bytes * 256 * sizeof(double))
            for i in range(start, stop):
                w = weights[q_start + q, i] * scales[i]
                row = &codes[i, 0]
                for r in range(row_bytes):
                    histogram[r * 256 + row[r]] += w
            acc = partial + q * d
            for j in range(d):
                r = j // per_byte
                k = <int> (j - r * per_byte)
                total = 0.0
                for v in range(256):
                    total = total + histogram[r * 256 + v] * centroids[(v >> (k * bits)) & mask]
                acc[j] = total
    else:
        for q in range(q_count):
            acc = partial + q * d
            for j in range(d):
                acc[j] = 0.0
        for i in range(start, stop):
            row = &codes[i, 0]
            for q in range(q_count):
                w = weights[q_start + q, i] * scales[i]
                if w == 0.0:
                    continue
                acc = partial + q * d
                for j in range(d):
                    acc[j] += w * centroids[read_index(row, j, bits, row_bytes)]


cdef void small_code_weighted_sum(const uint8_t[:, ::1] codes, int bits, const double[::1] centroids,
                                  const float[:, ::1] weights, const double[::1] scales,
                                  double[:, ::1] out, float* partial, Py_ssize_t chunk,
                                  int team) noexcept nogil:
    """float32 weighted sums of codes with at most TQ_LUT_MAX_BITS bits
    (include/tq_lut.h): float32 partial sums per chunk of ``chunk`` rows, added
    into ``out`` in double, in chunk order."""
    cdef Py_ssize_t m = weights.shape[0], n = codes.shape[0], d = out.shape[1]
    cdef Py_ssize_t row_bytes = codes.shape[1], n_chunks = (n + chunk - 1) // chunk
    cdef Py_ssize_t c, q, j, start
    cdef int variant = kernel_variant
    cdef float cents[16]
    centroids_f32(centroids, bits, cents)
    for c in prange(n_chunks, num_threads=team, schedule="dynamic"):
        start = c * chunk
        memset(partial + c * m * d, 0, m * d * sizeof(float))
        q = 0
        while q < m:
            tq_lut_weighted_sum(variant, &codes[start, 0], min(chunk, n - start), row_bytes, bits, cents,
                                &weights[q, start], weights.shape[1], min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, m - q),
                                &scales[start], d, partial + (c * m + q) * d)
            q = q + TQ_LUT_MAX_QUERIES
    for c in range(n_chunks):
        for q in range(m):
            for j in range(d):
                out[q, j] += partial[(c * m + q) * d + j]


def lut_weighted_sum(const uint8_t[:, ::1] codes, int bits, const double[::1] centroids,
                     const floating[:, ::1] weights, const double[::1] scales,
                     double[:, ::1] out, int n_threads):
    """Weighted sums of dequantized codes without materialising them.

    ``out[q, :] = sum_i weights[q, i] * scales[i] * centroids[index(i, :)]``
    (in the codes' rotated domain). Tokens are split into chunks whose size
    depends only on ``n``; chunk partial sums are added in chunk order, so the
    result is identical for every thread count.

    float32 weights with 1 to 4 bits are summed in float32 within chunks of at
    most a few thousand tokens by the vectorized decoder of ``include/tq_lut.h``
    (centroids rounded to float32), and the chunks in double. Otherwise
    everything is accumulated in double.

    Parameters
    ----------
    codes : (n, ceil(d*bits/8)) uint8
    bits : int in 1..8
    centroids : (2**bits,) float64
    weights : (m, n) float32 or float64
    scales : (n,) float64
    out : (m, d) float64, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t m = weights.shape[0], n = codes.shape[0], d = out.shape[1]
    cdef Py_ssize_t row_bytes = codes.shape[1]
    cdef Py_ssize_t chunk = 2048, query_block = 16
    cdef Py_ssize_t n_chunks, c, q0, qn, q, j, team
    cdef double* histograms
    cdef double* partial
    cdef float* partial32
    out[:, :] = 0.0
    if n == 0 or m == 0:
        return
    if floating is float:
        if bits <= TQ_LUT_MAX_BITS:
            chunk = small_code_chunk(n)
            n_chunks = (n + chunk - 1) // chunk
            qn = min(m, query_block)
            partial32 = <float*> malloc(n_chunks * qn * d * sizeof(float))
            if partial32 == NULL:
                raise MemoryError()
            team = threads_for_codes(n * qn * row_bytes, min(n_threads, n_chunks))
            try:
                for q0 in range(0, m, query_block):
                    qn = min(query_block, m - q0)
                    with nogil:
                        small_code_weighted_sum(codes, bits, centroids, weights[q0:q0 + qn], scales,
                                                out[q0:q0 + qn], partial32, chunk, team)
            finally:
                free(partial32)
            return
    while (n + chunk - 1) // chunk > 256:
        chunk *= 2
    n_chunks = (n + chunk - 1) // chunk
    team = threads_for(n * d * min(m, query_block), min(n_threads, n_chunks))
    histograms = <double*> malloc(team * row_bytes * 256 * sizeof(double))
    partial = <double*> malloc(n_chunks * query_block * d * sizeof(double))
    if histograms == NULL or partial == NULL:
        free(histograms)
        free(partial)
        raise MemoryError()
    try:
        with nogil:
            q0 = 0
            while q0 < m:
                qn = min(query_block, m - q0)
                for c in prange(n_chunks, num_threads=team, schedule="static"):
                    accumulate_chunk(codes, bits, &centroids[0], weights, scales, q0, qn,
                                     c * chunk, min((c + 1) * chunk, n), d,
                                     histograms + tq_thread_num() * row_bytes * 256,
                                     partial + c * query_block * d)
                for c in range(n_chunks):
                    for q in range(qn):
                        for j in range(d):
                            out[q0 + q, j] += partial[(c * query_block + q) * d + j]
                q0 += qn
    finally:
        free(histograms)
        free(partial)


cdef check_rotation(const float[:, ::1] rotation, Py_ssize_t d):
    if rotation is not None and (rotation.shape[0] != d or rotation.shape[1] != d):
        raise ValueError(f"a rotation must be ({d}, {d}), got ({rotation.shape[0]}, {rotation.shape[1]})")


cdef check_addresses(const uintptr_t[::1] addresses, Py_ssize_t heads):
    if addresses is not None and addresses.shape[0] != heads:
        raise ValueError(f"expected {heads} addresses, got {addresses.shape[0]}")


cdef inline Py_ssize_t small_code_chunk(Py_ssize_t n) noexcept nogil:
    """Rows per parallel work item of the float32 weighted sums: 512, doubled
    until there are at most 256 chunks (depends on ``n`` only)."""
    cdef Py_ssize_t chunk = 512
    while (n + chunk - 1) // chunk > 256:
        chunk *= 2
    return chunk


# Queries per pass of small_code_attention over the codes (bounds its scratch).
DEF ATTENTION_QUERY_BLOCK = 16


cdef int attend_small_codes(const uint8_t* key_codes, const float* key_norms, Py_ssize_t key_bytes,
                            int key_bits, const float* key_cents, const uint8_t* value_codes,
                            const float* value_norms, Py_ssize_t value_bytes, int value_bits,
                            const float* value_cents, Py_ssize_t n, const float* queries,
                            Py_ssize_t m, Py_ssize_t d, const float* key_rotation,
                            const float* value_rotation, double scale, float* out,
                            int n_threads) noexcept nogil:
    """The body of :func:`small_code_attention` on raw pointers (rows C-contiguous,
    either rotation NULL for none); ``out`` (m, d) is written. Returns -1 when
    out of memory, else 0."""
    cdef Py_ssize_t chunk = small_code_chunk(n), n_chunks = (n + chunk - 1) // chunk
    cdef Py_ssize_t block = min(m, <Py_ssize_t> ATTENTION_QUERY_BLOCK), c, q, q0, i, j, start, count, b0, mb
    cdef int team = threads_for_codes(n * m * (key_bytes + value_bytes), min(<Py_ssize_t> n_threads, n_chunks))
    cdef int variant = kernel_variant
    cdef float high
    cdef double total
    # All scratch in one block: the doubles first, then the floats.
    cdef Py_ssize_t doubles = d + n_chunks * block + 2 * n
    cdef Py_ssize_t floats = 2 * m * d + block * n + n_chunks * block + n_chunks * block * d
    cdef double* scratch = <double*> malloc(doubles * sizeof(double) + floats * sizeof(float))
    if scratch == NULL:
        return -1
    cdef double* acc = scratch
    cdef double* chunk_sum = acc + d
    cdef double* scales = chunk_sum + n_chunks * block
    cdef float* rotated = <float*> (scales + 2 * n)
    cdef float* target = rotated + m * d if value_rotation != NULL else out
    cdef float* logits = rotated + 2 * m * d
    cdef float* chunk_max = logits + block * n
    cdef float* partial = chunk_max + n_chunks * block
    if key_rotation != NULL:
        tq_small_product_f(variant, queries, m, d, key_rotation, rotated)
        queries = rotated
    for i in range(n):
        scales[i] = key_norms[i] * scale        # the scores come out as logits
        scales[n + i] = value_norms[i]
    b0 = 0
    while b0 < m:
        mb = min(block, m - b0)
        # Logits and their maximum, per chunk.
        for c in prange(n_chunks, num_threads=team, schedule="dynamic"):
            start = c * chunk
            count = min(chunk, n - start)
            for q in range(mb):
                chunk_max[c * mb + q] = -INFINITY
            q0 = 0
            while q0 < mb:
                tq_lut_scores(variant, key_codes + start * key_bytes, count, key_bytes, key_bits, key_cents,
                              queries + (b0 + q0) * d, min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, mb - q0),
                              d, scales + start, logits + q0 * n + start, n, 0,
                              chunk_max + c * mb + q0)
                q0 = q0 + TQ_LUT_MAX_QUERIES
        # Numerators exp(logit - max) and their weighted sums, per chunk.
        for c in prange(n_chunks, num_threads=team, schedule="dynamic"):
            start = c * chunk
            count = min(chunk, n - start)
            for q in range(mb):
                high = chunk_max[q]
                for j in range(1, n_chunks):
                    if chunk_max[j * mb + q] > high:
                        high = chunk_max[j * mb + q]
                chunk_sum[c * mb + q] = tq_exp_shifted(variant, logits + q * n + start, count, high)
            memset(partial + c * mb * d, 0, mb * d * sizeof(float))
            q0 = 0
            while q0 < mb:
                tq_lut_weighted_sum(variant, value_codes + start * value_bytes, count, value_bytes, value_bits,
                                    value_cents, logits + q0 * n + start, n,
                                    min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, mb - q0), scales + n + start, d,
                                    partial + (c * mb + q0) * d)
                q0 = q0 + TQ_LUT_MAX_QUERIES
        for q in range(mb):
            for j in range(d):
                acc[j] = 0.0
            total = 0.0
            for c in range(n_chunks):
                total = total + chunk_sum[c * mb + q]
                for j in range(d):
                    acc[j] += partial[(c * mb + q) * d + j]
            for j in range(d):
                target[(b0 + q) * d + j] = <float> (acc[j] / total)
        b0 = b0 + block
    if value_rotation != NULL:
        tq_small_product_f(variant, target, m, d, value_rotation, out)
    free(scratch)
    return 0


def small_code_attention(const uint8_t[:, ::1] key_codes, int key_bits, const double[::1] key_centroids,
                         const float[::1] key_norms, const uint8_t[:, ::1] value_codes, int value_bits,
                         const double[::1] value_centroids, const float[::1] value_norms,
                         const float[:, ::1] queries, const float[:, ::1] key_rotation,
                         const float[:, ::1] value_rotation, double scale, float[:, ::1] out,
                         int n_threads):
    """Softmax attention over MSE-coded keys and values in one pass, float32.

    ``out[q] = sum_i softmax_i(scale * <queries[q], k_i>) * v_i`` with
    ``k_i = key_norms[i] * key_centroids[key index(i, :)]`` and ``v_i`` alike,
    in the codes' rotated domains: ``queries`` are rotated like the keys, or
    are rotated here first as ``queries @ key_rotation``; ``out`` is in the
    values' domain, or is mapped back here as ``... @ value_rotation`` (both
    small products, :func:`small_product`). For each block of up to 16 queries, the
    scores and their maxima, then the softmax numerators (a float32
    exponential) and weighted sums are computed per chunk of rows in two
    parallel loops; chunk sums are combined in chunk order, so the result does
    not depend on the thread count. Codes of 1 to 4 bits only.

    Parameters
    ----------
    key_codes : (n, ceil(d*key_bits/8)) uint8
    key_bits, value_bits : int in 1..4
    key_centroids, value_centroids : (2**bits,) float64
    key_norms, value_norms : (n,) float32
    value_codes : (n, ceil(d*value_bits/8)) uint8
    queries : (m, d) float32
    key_rotation, value_rotation : (d, d) float32 or None
    scale : float
    out : (m, d) float32, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = key_codes.shape[0], m = queries.shape[0], d = queries.shape[1]
    cdef float key_cents[16]
    cdef float value_cents[16]
    cdef int status
    check_rotation(key_rotation, d)
    check_rotation(value_rotation, d)
    out[:, :] = 0.0
    if n == 0 or m == 0:
        return
    centroids_f32(key_centroids, key_bits, key_cents)
    centroids_f32(value_centroids, value_bits, value_cents)
    with nogil:
        status = attend_small_codes(&key_codes[0, 0], &key_norms[0], key_codes.shape[1], key_bits,
                                    key_cents, &value_codes[0, 0], &value_norms[0], value_codes.shape[1],
                                    value_bits, value_cents, n, &queries[0, 0], m, d,
                                    NULL if key_rotation is None else &key_rotation[0, 0],
                                    NULL if value_rotation is None else &value_rotation[0, 0],
                                    scale, &out[0, 0], n_threads)
    if status < 0:
        raise MemoryError()


def small_code_attention_heads(const uintptr_t[::1] key_codes, const uintptr_t[::1] key_norms,
                               Py_ssize_t key_bytes, int key_bits, const double[::1] key_centroids,
                               const uintptr_t[::1] value_codes, const uintptr_t[::1] value_norms,
                               Py_ssize_t value_bytes, int value_bits, const double[::1] value_centroids,
                               Py_ssize_t n, const float[:, :, ::1] queries,
                               const uintptr_t[::1] key_rotations, const uintptr_t[::1] value_rotations,
                               double scale, float[:, :, ::1] out, int n_threads):
    """:func:`small_code_attention` for every head of a multi-head cache in one call.

    Head ``h`` (one thread per head, the heads spread over the team) attends
    with ``queries[h]`` over the ``n`` rows whose codes and float32 norms start
    at the addresses ``key_codes[h]``, ``key_norms[h]``, ``value_codes[h]``,
    ``value_norms[h]`` (C-contiguous, ``key_bytes`` / ``value_bytes`` per row,
    every head with the same codebooks), its queries first multiplied by the
    (d, d) float32 matrix at ``key_rotations[h]`` and its output by the one at
    ``value_rotations[h]`` (either array None for no such step). Each head's
    result is the single-head kernel's on one thread, so nothing depends on
    the thread count. The caller keeps the arrays behind the addresses alive
    and of the stated shapes.

    Parameters
    ----------
    key_codes, key_norms, value_codes, value_norms : (heads,) uintptr
    key_bytes, value_bytes : int, bytes per code row
    key_bits, value_bits : int in 1..4
    key_centroids, value_centroids : (2**bits,) float64
    n : int, rows per head
    queries : (heads, m, d) float32
    key_rotations, value_rotations : (heads,) uintptr or None
    scale : float
    out : (heads, m, d) float32, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t heads = queries.shape[0], m = queries.shape[1], d = queries.shape[2], h
    cdef float key_cents[16]
    cdef float value_cents[16]
    cdef int failed = 0
    check_addresses(key_codes, heads)
    check_addresses(key_norms, heads)
    check_addresses(value_codes, heads)
    check_addresses(value_norms, heads)
    check_addresses(key_rotations, heads)
    check_addresses(value_rotations, heads)
    out[:, :, :] = 0.0
    if n == 0 or m == 0 or heads == 0:
        return
    centroids_f32(key_centroids, key_bits, key_cents)
    centroids_f32(value_centroids, value_bits, value_cents)
    for h in prange(heads, nogil=True, num_threads=threads_for_codes(
            heads * n * m * (key_bytes + value_bytes), min(<Py_ssize_t> n_threads, heads)), schedule="dynamic"):
        if attend_small_codes(<const uint8_t*> key_codes[h], <const float*> key_norms[h], key_bytes,
                              key_bits, key_cents, <const uint8_t*> value_codes[h],
                              <const float*> value_norms[h], value_bytes, value_bits, value_cents, n,
                              &queries[h, 0, 0], m, d,
                              NULL if key_rotations is None else <const float*> key_rotations[h],
                              NULL if value_rotations is None else <const float*> value_rotations[h],
                              scale, &out[h, 0, 0], 1) < 0:
            failed += 1
    if failed:
        raise MemoryError()


# ---------------------------------------------------------------------------
# Small dense products (rotating a few queries)
# ---------------------------------------------------------------------------

def small_product(const floating[:, ::1] x, const floating[:, ::1] matrix, floating[:, ::1] out):
    """``out = x @ matrix`` for a few rows.

    For the handful of query rows a read rotates (``x @ M.T`` is ``x @ (M.T)``
    with the transpose made contiguous by the caller): a fixed-order loop
    (include/tq_matrix.h) that costs less than a BLAS call's thread hand-offs.
    Single-threaded.

    Parameters
    ----------
    x : (m, d) float32 or float64
    matrix : (d, d), same dtype
    out : (m, d), same dtype, written (may not alias ``x``)
    """
    cdef Py_ssize_t m = x.shape[0], d = x.shape[1]
    if m == 0:
        return
    with nogil:
        if floating is float:
            tq_small_product_f(kernel_variant, &x[0, 0], m, d, &matrix[0, 0], &out[0, 0])
        else:
            tq_small_product_d(kernel_variant, &x[0, 0], m, d, &matrix[0, 0], &out[0, 0])
