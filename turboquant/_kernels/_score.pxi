# Lookup-table scores and weighted sums of codes (included by _core.pyx).

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
                            float[:, ::1] out, bint accumulate, int n_threads, int level) noexcept nogil:
    """float32 scores of codes with at most TQ_LUT_MAX_BITS bits (include/tq_lut.h)
    on kernel variant ``level``: rows in chunks of SMALL_CODE_ROWS, up to
    TQ_LUT_MAX_QUERIES queries per pass."""
    cdef Py_ssize_t m = queries.shape[0], d = queries.shape[1]
    cdef Py_ssize_t n = codes.shape[0], row_bytes = codes.shape[1]
    cdef Py_ssize_t n_chunks = (n + SMALL_CODE_ROWS - 1) // SMALL_CODE_ROWS, c, start, q0
    cdef float cents[1 << TQ_LUT_MAX_BITS]
    centroids_f32(centroids, bits, cents)
    with parallel(num_threads=threads_for_codes(n * m * row_bytes, min(<Py_ssize_t> n_threads, n_chunks))):
        tq_team_note()
        for c in prange(n_chunks, schedule="dynamic"):
            start = c * SMALL_CODE_ROWS
            q0 = 0
            while q0 < m:
                tq_lut_scores(level, &codes[start, 0], min(<Py_ssize_t> SMALL_CODE_ROWS, n - start), row_bytes,
                              bits, cents, &queries[q0, 0], min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, m - q0), d,
                              &scales[start], &out[q0, start], n, accumulate, NULL)
                q0 = q0 + TQ_LUT_MAX_QUERIES


def lut_inner_products(const uint8_t[:, ::1] codes, int bits, const double[::1] centroids,
                       const floating[:, ::1] queries, const double[::1] scales,
                       floating[:, ::1] out, bint accumulate, int n_threads, variant=None):
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
    variant : str, optional
        Kernel variant of the float32 path (one of ``_kernel_variants()``); the
        context's by default.
    """
    cdef int level = begin_call(variant)
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
            small_code_scores(codes, bits, centroids, queries, scales, out, accumulate, n_threads, level)
            return
    tables = <double*> malloc(block * table_size * sizeof(double))
    if tables == NULL:
        raise MemoryError()
    try:
        with nogil:
            q0 = 0
            while q0 < m:
                qn = min(block, m - q0)
                with parallel(num_threads=threads_for(qn * table_size, min(n_threads, qn))):
                    tq_team_note()
                    for q in prange(qn, schedule="static"):
                        build_table(&queries[q0 + q, 0], d, bits, &centroids[0], tables + q * table_size)
                with parallel(num_threads=threads_for(n * table_slots(d, bits) * qn, n_threads)):
                    tq_team_note()
                    for i in prange(n, schedule="static"):
                        for q in range(qn):
                            value = scales[i] * score_row(&codes[i, 0], tables + q * table_size, d, bits,
                                                          row_bytes)
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
                                  int team, int level) noexcept nogil:
    """float32 weighted sums of codes with at most TQ_LUT_MAX_BITS bits
    (include/tq_lut.h) on kernel variant ``level``: float32 partial sums per
    chunk of ``chunk`` rows, added into ``out`` in double, in chunk order."""
    cdef Py_ssize_t m = weights.shape[0], n = codes.shape[0], d = out.shape[1]
    cdef Py_ssize_t row_bytes = codes.shape[1], n_chunks = (n + chunk - 1) // chunk
    cdef Py_ssize_t c, q, j, start
    cdef float cents[1 << TQ_LUT_MAX_BITS]
    centroids_f32(centroids, bits, cents)
    with parallel(num_threads=team):
        tq_team_note()
        for c in prange(n_chunks, schedule="dynamic"):
            start = c * chunk
            memset(partial + c * m * d, 0, m * d * sizeof(float))
            q = 0
            while q < m:
                tq_lut_weighted_sum(level, &codes[start, 0], min(chunk, n - start), row_bytes, bits, cents,
                                    &weights[q, start], weights.shape[1],
                                    min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, m - q), &scales[start], d,
                                    partial + (c * m + q) * d)
                q = q + TQ_LUT_MAX_QUERIES
    for c in range(n_chunks):
        for q in range(m):
            for j in range(d):
                out[q, j] += partial[(c * m + q) * d + j]


def lut_weighted_sum(const uint8_t[:, ::1] codes, int bits, const double[::1] centroids,
                     const floating[:, ::1] weights, const double[::1] scales,
                     double[:, ::1] out, int n_threads, variant=None):
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
    variant : str, optional
        As for :func:`lut_inner_products`.
    """
    cdef int level = begin_call(variant)
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
                                                out[q0:q0 + qn], partial32, chunk, team, level)
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
                with parallel(num_threads=team):
                    tq_team_note()
                    for c in prange(n_chunks, schedule="static"):
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

