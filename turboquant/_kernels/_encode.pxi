# Norms, rotations, quantization and bit packing (included by _core.pyx).

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
    tq_call_begin(-1)
    with nogil, parallel(num_threads=threads_for(n * d, n_threads)):
        tq_team_note()
        for i in prange(n, schedule="static"):
            out[i] = row_norm(&x[i, 0], d)


# ---------------------------------------------------------------------------
# Randomized Hadamard rotation and quantization (include/tq_quantize.h)
# ---------------------------------------------------------------------------

cdef inline void* scratch_start(void* block) noexcept nogil:
    """First 64-byte aligned address of a block allocated with 64 spare bytes."""
    return <void*> ((<uintptr_t> block + 63) & ~(<uintptr_t> 63))


def hadamard_rotate(const floating[:, ::1] x, floating[:, ::1] out,
                    const double[:, ::1] signs, Py_ssize_t block, bint inverse,
                    int n_threads, variant=None):
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
    variant : str, optional
        Kernel variant (one of ``_kernel_variants()``); the context's by default.
    """
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], rounds = signs.shape[0]
    cdef Py_ssize_t n_tiles = (n + TQ_TILE - 1) // TQ_TILE, t, first, count
    cdef int team = threads_for(n * d, min(<Py_ssize_t> n_threads, n_tiles))
    cdef int level = begin_call(variant)
    cdef double* tile = NULL
    # One transposed tile of TQ_TILE rows per thread, indexed by the OpenMP thread number.
    # Tiles are independent, so they are handed out "guided" (big shares first, then
    # smaller ones to whichever thread is free): a thread whose core is busy with
    # something else (a spinning BLAS worker) does less instead of holding up the call.
    cdef void* scratch = malloc(team * TQ_TILE * d * sizeof(double) + 64)
    if scratch == NULL:
        raise MemoryError()
    try:
        with nogil, parallel(num_threads=team):
            tq_team_note()
            tile = <double*> scratch_start(scratch) + tq_thread_num() * TQ_TILE * d
            for t in prange(n_tiles, schedule="guided"):
                first = t * TQ_TILE
                count = min(<Py_ssize_t> TQ_TILE, n - first)
                if floating is float:
                    tq_hadamard_rotate_f(level, &x[first, 0], &out[first, 0], count, d,
                                         &signs[0, 0], rounds, block, inverse, tile)
                else:
                    tq_hadamard_rotate_d(level, &x[first, 0], &out[first, 0], count, d,
                                         &signs[0, 0], rounds, block, inverse, tile)
    finally:
        free(scratch)


cdef int quantize_rows(const floating* y, Py_ssize_t n, Py_ssize_t d, const double* norms,
                       const double* boundaries, int bits, const double* centroids, uint8_t* codes,
                       Py_ssize_t row_bytes, floating* residual, int team, int level) noexcept nogil:
    """The body of :func:`quantize_pack` on raw pointers (C-contiguous rows,
    ``residual`` NULL for none), tiles over a team of ``team`` threads on kernel
    variant ``level``. Returns -1 when out of memory, else 0."""
    cdef Py_ssize_t n_tiles = (n + TQ_TILE - 1) // TQ_TILE, t, first, count
    cdef Py_ssize_t tile_size = TQ_TILE * min(d, <Py_ssize_t> TQ_CHUNK)
    cdef double* tile = NULL
    cdef floating* res
    cdef void* scratch = malloc(team * tile_size * sizeof(double) + 64)
    if scratch == NULL:
        return -1
    with parallel(num_threads=team):
        tq_team_note()
        tile = <double*> scratch_start(scratch) + tq_thread_num() * tile_size
        for t in prange(n_tiles, schedule="guided"):
            first = t * TQ_TILE
            count = min(<Py_ssize_t> TQ_TILE, n - first)
            res = residual + first * d if residual != NULL else NULL
            if floating is float:
                tq_quantize_rows_f(level, y + first * d, count, d, norms + first, boundaries, bits,
                                   centroids, codes + first * row_bytes, row_bytes, res, tile)
            else:
                tq_quantize_rows_d(level, y + first * d, count, d, norms + first, boundaries, bits,
                                   centroids, codes + first * row_bytes, row_bytes, res, tile)
    free(scratch)
    return 0


def quantize_pack(const floating[:, ::1] y, const double[::1] norms,
                  const double[::1] boundaries, const double[::1] centroids, int bits,
                  uint8_t[:, ::1] codes, floating[:, ::1] residual, bint want_residual,
                  int n_threads, variant=None):
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
    variant : str, optional
        As for :func:`hadamard_rotate`.
    """
    cdef Py_ssize_t n = y.shape[0], d = y.shape[1]
    cdef int level = begin_call(variant)
    cdef int status
    if n == 0:
        return
    with nogil:
        status = quantize_rows(&y[0, 0], n, d, &norms[0], &boundaries[0], bits, &centroids[0],
                               &codes[0, 0], codes.shape[1], &residual[0, 0] if want_residual else NULL,
                               threads_for(n * d, min(<Py_ssize_t> n_threads, (n + TQ_TILE - 1) // TQ_TILE)),
                               level)
    if status < 0:
        raise MemoryError()


def small_dense_quantize_pack(const floating[:, ::1] x, const floating[:, ::1] operand,
                              const double[::1] boundaries, const double[::1] centroids, int bits,
                              double[::1] norms, uint8_t[:, ::1] codes, floating[:, ::1] residual,
                              bint want_residual, variant=None):
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
    variant : str, optional
        As for :func:`hadamard_rotate`.
    """
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], i
    cdef int level = begin_call(variant)
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
            tq_small_product_f(level, &x[0, 0], n, d, &operand[0, 0], rotated)
        else:
            tq_small_product_d(level, &x[0, 0], n, d, &operand[0, 0], rotated)
        status = quantize_rows(rotated, n, d, &norms[0], &boundaries[0], bits, &centroids[0],
                               &codes[0, 0], codes.shape[1], &residual[0, 0] if want_residual else NULL,
                               1, level)
    free(rotated)
    if status < 0:
        raise MemoryError()


def hadamard_quantize_pack(const floating[:, ::1] x, const double[:, ::1] signs,
                           Py_ssize_t block, const double[::1] boundaries,
                           const double[::1] centroids, int bits, double[::1] norms,
                           uint8_t[:, ::1] codes, floating[:, ::1] residual,
                           bint want_residual, int n_threads, variant=None):
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
    variant : str, optional
        As for :func:`hadamard_rotate`.
    """
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], rounds = signs.shape[0]
    cdef Py_ssize_t row_bytes = codes.shape[1], n_tiles = (n + TQ_TILE - 1) // TQ_TILE
    cdef Py_ssize_t n_bounds = boundaries.shape[0], t, first, count, k
    cdef int team = threads_for(n * d, min(<Py_ssize_t> n_threads, n_tiles))
    cdef int level = begin_call(variant)
    cdef floating* tile = NULL
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
        with nogil, parallel(num_threads=team):
            tq_team_note()
            tile = <floating*> scratch_start(scratch) + tq_thread_num() * TQ_TILE * d
            for t in prange(n_tiles, schedule="guided"):
                first = t * TQ_TILE
                count = min(<Py_ssize_t> TQ_TILE, n - first)
                res = &residual[first, 0] if want_residual else NULL
                if floating is float:
                    tq_hadamard_quantize_f(level, &x[first, 0], count, d, signs_t, rounds, block,
                                           bounds_t, bits, &centroids[0], &norms[first],
                                           &codes[first, 0], row_bytes, res, tile)
                else:
                    tq_hadamard_quantize_d(level, &x[first, 0], count, d, signs_t, rounds, block,
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
    tq_call_begin(-1)
    with nogil, parallel(num_threads=threads_for(n * d, n_threads)):
        tq_team_note()
        for i in prange(n, schedule="static"):
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
    tq_call_begin(-1)
    with nogil, parallel(num_threads=threads_for(n * d, n_threads)):
        tq_team_note()
        for i in prange(n, schedule="static"):
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
    tq_call_begin(-1)
    with nogil, parallel(num_threads=threads_for(n * d, n_threads)):
        tq_team_note()
        for i in prange(n, schedule="static"):
            for j in range(d):
                out[i, j] = <floating> (
                    scales[i] * centroids[read_index(&codes[i, 0], j, bits, row_bytes)])



# ---------------------------------------------------------------------------
# Small dense products (rotating a few queries)
# ---------------------------------------------------------------------------

def small_product(const floating[:, ::1] x, const floating[:, ::1] matrix, floating[:, ::1] out,
                  variant=None):
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
    variant : str, optional
        As for :func:`hadamard_rotate`.
    """
    cdef Py_ssize_t m = x.shape[0], d = x.shape[1]
    cdef int level = begin_call(variant)
    if m == 0:
        return
    with nogil:
        if floating is float:
            tq_small_product_f(level, &x[0, 0], m, d, &matrix[0, 0], &out[0, 0])
        else:
            tq_small_product_d(level, &x[0, 0], m, d, &matrix[0, 0], &out[0, 0])
