# Fused attention over small codes (included by _core.pyx).


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
                            int n_threads, int level) noexcept nogil:
    """The body of :func:`small_code_attention` on raw pointers (rows C-contiguous,
    either rotation NULL for none) on kernel variant ``level``; ``out`` (m, d) is
    written. Returns -1 when out of memory, else 0."""
    cdef Py_ssize_t chunk = small_code_chunk(n), n_chunks = (n + chunk - 1) // chunk
    cdef Py_ssize_t block = min(m, <Py_ssize_t> ATTENTION_QUERY_BLOCK), c, q, q0, i, j, start, count, b0, mb
    cdef int team = threads_for_codes(n * m * (key_bytes + value_bytes), min(<Py_ssize_t> n_threads, n_chunks))
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
        tq_small_product_f(level, queries, m, d, key_rotation, rotated)
        queries = rotated
    for i in range(n):
        scales[i] = key_norms[i] * scale        # the scores come out as logits
        scales[n + i] = value_norms[i]
    b0 = 0
    while b0 < m:
        mb = min(block, m - b0)
        # Logits and their maximum, per chunk.
        with parallel(num_threads=team):
            tq_team_note()
            for c in prange(n_chunks, schedule="dynamic"):
                start = c * chunk
                count = min(chunk, n - start)
                for q in range(mb):
                    chunk_max[c * mb + q] = -INFINITY
                q0 = 0
                while q0 < mb:
                    tq_lut_scores(level, key_codes + start * key_bytes, count, key_bytes, key_bits, key_cents,
                                  queries + (b0 + q0) * d, min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, mb - q0),
                                  d, scales + start, logits + q0 * n + start, n, 0,
                                  chunk_max + c * mb + q0)
                    q0 = q0 + TQ_LUT_MAX_QUERIES
        # Numerators exp(logit - max) and their weighted sums, per chunk.
        with parallel(num_threads=team):
            for c in prange(n_chunks, schedule="dynamic"):
                start = c * chunk
                count = min(chunk, n - start)
                for q in range(mb):
                    high = chunk_max[q]
                    for j in range(1, n_chunks):
                        if chunk_max[j * mb + q] > high:
                            high = chunk_max[j * mb + q]
                    chunk_sum[c * mb + q] = tq_exp_shifted(level, logits + q * n + start, count, high)
                memset(partial + c * mb * d, 0, mb * d * sizeof(float))
                q0 = 0
                while q0 < mb:
                    tq_lut_weighted_sum(level, value_codes + start * value_bytes, count, value_bytes,
                                        value_bits, value_cents, logits + q0 * n + start, n,
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
        tq_small_product_f(level, target, m, d, value_rotation, out)
    free(scratch)
    return 0


def small_code_attention(const uint8_t[:, ::1] key_codes, int key_bits, const double[::1] key_centroids,
                         const float[::1] key_norms, const uint8_t[:, ::1] value_codes, int value_bits,
                         const double[::1] value_centroids, const float[::1] value_norms,
                         const float[:, ::1] queries, const float[:, ::1] key_rotation,
                         const float[:, ::1] value_rotation, double scale, float[:, ::1] out,
                         int n_threads, variant=None):
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
    variant : str, optional
        Kernel variant (one of ``_kernel_variants()``); the context's by default.
    """
    cdef int level = begin_call(variant)
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
                                    scale, &out[0, 0], n_threads, level)
    if status < 0:
        raise MemoryError()


def small_code_attention_heads(const uintptr_t[::1] key_codes, const uintptr_t[::1] key_norms,
                               Py_ssize_t key_bytes, int key_bits, const double[::1] key_centroids,
                               const uintptr_t[::1] value_codes, const uintptr_t[::1] value_norms,
                               Py_ssize_t value_bytes, int value_bits, const double[::1] value_centroids,
                               Py_ssize_t n, const float[:, :, ::1] queries,
                               const uintptr_t[::1] key_rotations, const uintptr_t[::1] value_rotations,
                               double scale, float[:, :, ::1] out, int n_threads, variant=None):
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
    variant : str, optional
        As for :func:`small_code_attention`.
    """
    cdef int level = begin_call(variant)
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
    with nogil, parallel(num_threads=threads_for_codes(heads * n * m * (key_bytes + value_bytes),
                                                     min(<Py_ssize_t> n_threads, heads))):
        tq_team_note()
        for h in prange(heads, schedule="dynamic"):
            if attend_small_codes(<const uint8_t*> key_codes[h], <const float*> key_norms[h], key_bytes,
                                  key_bits, key_cents, <const uint8_t*> value_codes[h],
                                  <const float*> value_norms[h], value_bytes, value_bits, value_cents, n,
                                  &queries[h, 0, 0], m, d,
                                  NULL if key_rotations is None else <const float*> key_rotations[h],
                                  NULL if value_rotations is None else <const float*> value_rotations[h],
                                  scale, &out[h, 0, 0], 1, level) < 0:
                failed += 1
    if failed:
        raise MemoryError()


