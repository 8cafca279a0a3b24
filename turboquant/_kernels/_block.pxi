# Block-scaled MSE codes: a row y (already rotated) is held as a scale g (the
# caller's, float16-rounded rms), one of SCALE_LEVELS factors f[k] per block of
# BLOCK coordinates (4-bit indices, packed like codes), and a ``bits``-bit index
# per coordinate: y[j] ~ g * f[k(j // BLOCK)] * centroids[index j].

cdef enum:
    SCALE_BLOCK = 16
    SCALE_BITS = 4


cdef inline uint32_t nearest_cell(const double* bounds, int bits, double u) noexcept nogil:
    """The cell of ``u`` among the sorted ``2**bits - 1`` boundaries (a tie goes up)."""
    cdef uint32_t low = 0, step = 1u << (bits - 1)
    while step:
        if u >= bounds[low + step - 1]:
            low += step
        step >>= 1
    return low


cdef inline double block_error(const floating* y, Py_ssize_t count, double scale, const double* bounds,
                               int bits, const double* centroids) noexcept nogil:
    """Squared error of ``count`` values coded with ``scale``."""
    cdef double error = 0.0, diff
    cdef Py_ssize_t j
    for j in range(count):
        diff = y[j] - scale * centroids[nearest_cell(bounds, bits, y[j] / scale)]
        error += diff * diff
    return error


def block_quantize_pack(const floating[:, ::1] y, const double[::1] scales, const double[::1] boundaries,
                        const double[::1] centroids, const double[::1] factors, int bits,
                        uint8_t[:, ::1] codes, uint8_t[:, ::1] block_codes, int n_threads):
    """Block-scaled codes of rotated rows: per block the factor of least squared error.

    Parameters
    ----------
    y : (n, d) float32 or float64, rotated rows
    scales : (n,) float64, the rows' scales g (a zero scale codes the row as zeros)
    boundaries : (2**bits - 1,) float64, sorted midpoints of ``centroids``
    centroids : (2**bits,) float64
    factors : (16,) float64, sorted, positive
    bits : int in 1..8
    codes : (n, ceil(d*bits/8)) uint8, written
    block_codes : (n, ceil(ceil(d/16)*4/8)) uint8, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = y.shape[0], d = y.shape[1], i, b, j, start, count
    cdef Py_ssize_t n_blocks = (d + SCALE_BLOCK - 1) // SCALE_BLOCK
    cdef Py_ssize_t row_bytes = codes.shape[1], block_bytes = block_codes.shape[1]
    cdef Py_ssize_t n_factors = factors.shape[0]
    cdef int k, best
    cdef double error, least, scale
    tq_call_begin(-1)
    with nogil, parallel(num_threads=threads_for(n * d * n_factors, n_threads)):
        tq_team_note()
        for i in prange(n, schedule="static"):
            memset(&codes[i, 0], 0, row_bytes)
            memset(&block_codes[i, 0], 0, block_bytes)
            for b in range(n_blocks):
                start = b * SCALE_BLOCK
                count = min(<Py_ssize_t> SCALE_BLOCK, d - start)
                best = 0
                if scales[i] > 0.0:
                    least = INFINITY
                    for k in range(n_factors):
                        error = block_error(&y[i, start], count, scales[i] * factors[k], &boundaries[0],
                                            bits, &centroids[0])
                        if error < least:
                            least = error
                            best = k
                write_index(&block_codes[i, 0], b, SCALE_BITS, <uint32_t> best)
                scale = scales[i] * factors[best]
                for j in range(start, start + count):
                    write_index(&codes[i, 0], j, bits, nearest_cell(
                        &boundaries[0], bits, y[i, j] / scale if scale > 0.0 else 0.0))


cdef inline double block_scale(const uint8_t* block_row, Py_ssize_t j, Py_ssize_t block_bytes,
                               const double* factors) noexcept nogil:
    """The factor of coordinate ``j``'s block."""
    return factors[read_index(block_row, j // SCALE_BLOCK, SCALE_BITS, block_bytes)]


def block_dequantize(const uint8_t[:, ::1] codes, const uint8_t[:, ::1] block_codes, int bits,
                     const double[::1] centroids, const double[::1] factors, const double[::1] scales,
                     floating[:, ::1] out, int n_threads):
    """``out[i, j] = scales[i] * factors[k(i, j // 16)] * centroids[index(i, j)]`` (rotated domain).

    Parameters
    ----------
    codes, block_codes : as written by :func:`block_quantize_pack`
    bits : int in 1..8
    centroids : (2**bits,) float64
    factors : (16,) float64
    scales : (n,) float64
    out : (n, d) float32 or float64, written
    n_threads : int >= 1
    """
    cdef Py_ssize_t n = out.shape[0], d = out.shape[1], i, j
    cdef Py_ssize_t row_bytes = codes.shape[1], block_bytes = block_codes.shape[1]
    tq_call_begin(-1)
    with nogil, parallel(num_threads=threads_for(n * d, n_threads)):
        tq_team_note()
        for i in prange(n, schedule="static"):
            for j in range(d):
                out[i, j] = <floating> (scales[i] * block_scale(&block_codes[i, 0], j, block_bytes, &factors[0])
                                        * centroids[read_index(&codes[i, 0], j, bits, row_bytes)])


def block_inner_products(const uint8_t[:, ::1] codes, const uint8_t[:, ::1] block_codes, int bits,
                         const double[::1] centroids, const double[::1] factors, const double[::1] scales,
                         const floating[:, ::1] queries, floating[:, ::1] out, int n_threads):
    """``out[q, i] = scales[i] * sum_b factors[k(i, b)] * sum_(j in b) queries[q, j] * centroids[index(i, j)]``.

    ``queries`` (m, d) are in the rotated domain; ``out`` is (m, n). Sums run in
    float64 in a fixed order, so results do not depend on the thread count.
    """
    cdef Py_ssize_t m = queries.shape[0], d = queries.shape[1], n = codes.shape[0]
    cdef Py_ssize_t row_bytes = codes.shape[1], block_bytes = block_codes.shape[1]
    cdef Py_ssize_t i, q, b, j, start, stop
    cdef Py_ssize_t n_blocks = (d + SCALE_BLOCK - 1) // SCALE_BLOCK
    cdef double total, part
    tq_call_begin(-1)
    with nogil, parallel(num_threads=threads_for(n * m * d, n_threads)):
        tq_team_note()
        for i in prange(n, schedule="static"):
            for q in range(m):
                total = 0.0
                for b in range(n_blocks):
                    start = b * SCALE_BLOCK
                    stop = min(start + <Py_ssize_t> SCALE_BLOCK, d)
                    part = 0.0
                    for j in range(start, stop):
                        part = part + queries[q, j] * centroids[read_index(&codes[i, 0], j, bits, row_bytes)]
                    total = total + factors[read_index(&block_codes[i, 0], b, SCALE_BITS, block_bytes)] * part
                out[q, i] = <floating> (scales[i] * total)


def block_weighted_sum(const uint8_t[:, ::1] codes, const uint8_t[:, ::1] block_codes, int bits,
                       const double[::1] centroids, const double[::1] factors, const double[::1] scales,
                       const double[:, ::1] weights, double[:, ::1] out, int n_threads):
    """``out[q, j] = sum_i weights[q, i] * scales[i] * factors[k(i, j // 16)] * centroids[index(i, j)]``.

    ``weights`` is (m, n), ``out`` (m, d) in the rotated domain, summed over
    ``i`` in order (independent of the thread count).
    """
    cdef Py_ssize_t m = weights.shape[0], n = codes.shape[0], d = out.shape[1]
    cdef Py_ssize_t row_bytes = codes.shape[1], block_bytes = block_codes.shape[1]
    cdef Py_ssize_t i, q, j
    cdef double w
    tq_call_begin(-1)
    with nogil, parallel(num_threads=threads_for(n * m * d, n_threads)):
        tq_team_note()
        for q in prange(m, schedule="static"):
            for j in range(d):
                out[q, j] = 0.0
            for i in range(n):
                w = weights[q, i] * scales[i]
                for j in range(d):
                    out[q, j] += w * block_scale(&block_codes[i, 0], j, block_bytes, &factors[0]) \
                        * centroids[read_index(&codes[i, 0], j, bits, row_bytes)]
