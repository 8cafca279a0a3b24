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
# Coded parts of a key whose scores add up (main and outlier channels, each an
# MSE stage and optionally the QJL signs of its residual).
DEF MAX_KEY_SIDES = 4


cdef struct coded_rows:
    # One side (values, or one coded part of the keys) of the fused attention:
    # n rows of packed ``bits``-bit codes and float32 norms, and optionally
    # block-scale codes (``blocks`` NULL for plain MSE codes). Row i is scaled
    # by ``norms[i] * norms2[i] * factor`` (``norms2`` NULL for 1). A key part
    # is scored against its own (m, width) float32 ``queries``.
    const uint8_t* codes
    const float* norms
    const float* norms2
    double factor
    Py_ssize_t row_bytes
    int bits
    float centroids[1 << TQ_LUT_MAX_BITS]
    const uint8_t* blocks
    Py_ssize_t block_bytes
    float factors[16]
    const float* queries
    Py_ssize_t width


cdef inline void rows_scores(int level, const coded_rows* rows, Py_ssize_t start, Py_ssize_t count,
                             const float* queries, Py_ssize_t m, Py_ssize_t d, const double* scales,
                             float* out, Py_ssize_t out_stride, int accumulate, float* high) noexcept nogil:
    """Scores of rows ``start .. start + count - 1`` (tq_lut_scores or tq_block_scores)."""
    if rows.blocks == NULL:
        tq_lut_scores(level, rows.codes + start * rows.row_bytes, count, rows.row_bytes, rows.bits,
                      rows.centroids, queries, m, d, scales + start, out, out_stride, accumulate, high)
    else:
        tq_block_scores(level, rows.codes + start * rows.row_bytes, rows.blocks + start * rows.block_bytes,
                        count, rows.row_bytes, rows.block_bytes, rows.bits, rows.centroids, rows.factors,
                        queries, m, d, scales + start, out, out_stride, accumulate, high)


cdef inline void rows_weighted_sum(int level, const coded_rows* rows, Py_ssize_t start, Py_ssize_t count,
                                   const float* weights, Py_ssize_t weight_stride, Py_ssize_t m,
                                   const double* scales, Py_ssize_t d, float* acc) noexcept nogil:
    """Weighted sums of rows ``start .. start + count - 1`` (tq_lut_weighted_sum or tq_block_weighted_sum)."""
    if rows.blocks == NULL:
        tq_lut_weighted_sum(level, rows.codes + start * rows.row_bytes, count, rows.row_bytes, rows.bits,
                            rows.centroids, weights, weight_stride, m, scales + start, d, acc)
    else:
        tq_block_weighted_sum(level, rows.codes + start * rows.row_bytes, rows.blocks + start * rows.block_bytes,
                              count, rows.row_bytes, rows.block_bytes, rows.bits, rows.centroids, rows.factors,
                              weights, weight_stride, m, scales + start, d, acc)


cdef inline double row_scale(const coded_rows* rows, Py_ssize_t i) noexcept nogil:
    """The scale of row ``i``: ``norms[i] * norms2[i] * factor``."""
    cdef double value = rows.norms[i] * rows.factor
    if rows.norms2 != NULL:
        value = value * rows.norms2[i]
    return value


cdef int attend_small_codes(const coded_rows* keys, int key_sides, const coded_rows* values, Py_ssize_t n,
                            Py_ssize_t m, Py_ssize_t d, const float* key_rotation,
                            const float* value_rotation, double scale, float* out, float* lse,
                            int n_threads, int level) noexcept nogil:
    """The body of :func:`small_code_attention` on raw pointers (rows C-contiguous,
    either rotation NULL for none; a key rotation only with one key side, of
    width ``d``) on kernel variant ``level``: a key's score is the sum of its
    ``key_sides`` parts' scores, each against that part's queries. ``out`` (m, d)
    is written, and ``lse`` (m,) too unless NULL. Returns -1 when out of memory, else 0."""
    cdef Py_ssize_t chunk = small_code_chunk(n), n_chunks = (n + chunk - 1) // chunk
    cdef Py_ssize_t block = min(m, <Py_ssize_t> ATTENTION_QUERY_BLOCK), c, q, q0, i, j, start, count, b0, mb
    cdef Py_ssize_t code_bytes = values.row_bytes + values.block_bytes
    cdef int team, s
    cdef float high
    cdef double total
    cdef const float* queries[MAX_KEY_SIDES]
    for s in range(key_sides):
        code_bytes = code_bytes + keys[s].row_bytes + keys[s].block_bytes
        queries[s] = keys[s].queries
    team = threads_for_codes(n * m * code_bytes, min(<Py_ssize_t> n_threads, n_chunks))
    # All scratch in one block: the doubles first, then the floats.
    cdef Py_ssize_t doubles = d + n_chunks * block + (key_sides + 1) * n
    cdef Py_ssize_t floats = 2 * m * d + block * n + n_chunks * block + n_chunks * block * d
    cdef double* scratch = <double*> malloc(doubles * sizeof(double) + floats * sizeof(float))
    if scratch == NULL:
        return -1
    cdef double* acc = scratch
    cdef double* chunk_sum = acc + d
    cdef double* scales = chunk_sum + n_chunks * block
    cdef double* value_scales = scales + key_sides * n
    cdef float* rotated = <float*> (value_scales + n)
    cdef float* target = rotated + m * d if value_rotation != NULL else out
    cdef float* logits = rotated + 2 * m * d
    cdef float* chunk_max = logits + block * n
    cdef float* partial = chunk_max + n_chunks * block
    if key_rotation != NULL:
        tq_small_product_f(level, queries[0], m, d, key_rotation, rotated)
        queries[0] = rotated
    for s in range(key_sides):
        for i in range(n):
            scales[s * n + i] = row_scale(&keys[s], i) * scale     # the scores come out as logits
    for i in range(n):
        value_scales[i] = row_scale(values, i)
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
                    # The parts' scores add up; the maxima are taken on the last.
                    for s in range(key_sides):
                        rows_scores(level, &keys[s], start, count, queries[s] + (b0 + q0) * keys[s].width,
                                    min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, mb - q0), keys[s].width,
                                    scales + s * n, logits + q0 * n + start, n, s > 0,
                                    chunk_max + c * mb + q0 if s == key_sides - 1 else NULL)
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
                    rows_weighted_sum(level, values, start, count, logits + q0 * n + start, n,
                                      min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, mb - q0), value_scales, d,
                                      partial + (c * mb + q0) * d)
                    q0 = q0 + TQ_LUT_MAX_QUERIES
        for q in range(mb):
            for j in range(d):
                acc[j] = 0.0
            total = 0.0
            high = chunk_max[q]
            for c in range(n_chunks):
                total = total + chunk_sum[c * mb + q]
                if chunk_max[c * mb + q] > high:
                    high = chunk_max[c * mb + q]
                for j in range(d):
                    acc[j] += partial[(c * mb + q) * d + j]
            for j in range(d):
                target[(b0 + q) * d + j] = <float> (acc[j] / total)
            if lse != NULL:
                lse[b0 + q] = <float> (high + log(total))
        b0 = b0 + block
    if value_rotation != NULL:
        tq_small_product_f(level, target, m, d, value_rotation, out)
    free(scratch)
    return 0


cdef set_coded_rows(coded_rows* rows, const uint8_t* codes, const float* norms, Py_ssize_t row_bytes,
                    int bits, const double[::1] centroids, const uint8_t* blocks, Py_ssize_t block_bytes,
                    const double[::1] factors):
    """Fill ``rows`` (the float32 tables from the float64 ones; ``blocks`` NULL for plain codes)."""
    if not 1 <= bits <= TQ_LUT_MAX_BITS or centroids.shape[0] != (1 << bits):
        raise ValueError(f"fused attention reads 1..{TQ_LUT_MAX_BITS}-bit codes with 2**bits centroids, "
                         f"got bits={bits}")
    if blocks != NULL and bits > 4:
        raise ValueError(f"block-scaled codes have 1..4 bits, got bits={bits}")
    rows.codes, rows.norms, rows.row_bytes, rows.bits = codes, norms, row_bytes, bits
    rows.norms2, rows.factor, rows.queries, rows.width = NULL, 1.0, NULL, 0
    rows.blocks, rows.block_bytes = blocks, (block_bytes if blocks != NULL else 0)
    centroids_f32(centroids, bits, rows.centroids)
    memset(rows.factors, 0, sizeof(rows.factors))
    if blocks != NULL:
        if factors is None or factors.shape[0] != 16:
            raise ValueError("block-scale codes need 16 factors")
        for j in range(16):
            rows.factors[j] = <float> factors[j]


cdef check_block_codes(const uint8_t[:, ::1] blocks, Py_ssize_t n, Py_ssize_t d):
    if blocks is not None and (blocks.shape[0] != n or blocks.shape[1] != (((d + 15) // 16) * 4 + 7) // 8):
        raise ValueError(f"block-scale codes must be ({n}, {(((d + 15) // 16) * 4 + 7) // 8}), "
                         f"got ({blocks.shape[0]}, {blocks.shape[1]})")


cdef set_key_part(coded_rows* rows, part, Py_ssize_t n, Py_ssize_t m):
    """Fill ``rows`` from one ``extra_keys`` tuple of :func:`small_code_attention`
    (its arrays stay alive with the tuple)."""
    if not isinstance(part, tuple) or len(part) != 9:
        raise ValueError("an extra key part is a tuple (codes, bits, centroids, norms, norms2, factor, "
                         "block_scales, block_factors, queries)")
    cdef const uint8_t[:, ::1] codes = part[0]
    cdef const float[::1] norms = part[3]
    cdef const float[::1] norms2 = part[4]
    cdef const uint8_t[:, ::1] blocks = part[6]
    cdef const float[:, ::1] queries = part[8]
    cdef int bits = part[1]
    if codes.shape[0] != n or norms.shape[0] != n or (norms2 is not None and norms2.shape[0] != n):
        raise ValueError(f"every key part needs {n} rows and norms")
    if queries.shape[0] != m or codes.shape[1] != (queries.shape[1] * bits + 7) // 8:
        raise ValueError(f"a key part's queries must be ({m}, width) with {codes.shape[1]} code bytes per row")
    check_block_codes(blocks, n, queries.shape[1])
    set_coded_rows(rows, &codes[0, 0], &norms[0], codes.shape[1], bits, part[2],
                   NULL if blocks is None else &blocks[0, 0], 0 if blocks is None else blocks.shape[1], part[7])
    rows.norms2 = NULL if norms2 is None else &norms2[0]
    rows.factor = part[5]
    rows.queries, rows.width = &queries[0, 0], queries.shape[1]


def small_code_attention(const uint8_t[:, ::1] key_codes, int key_bits, const double[::1] key_centroids,
                         const float[::1] key_norms, const uint8_t[:, ::1] value_codes, int value_bits,
                         const double[::1] value_centroids, const float[::1] value_norms,
                         const float[:, ::1] queries, const float[:, ::1] key_rotation,
                         const float[:, ::1] value_rotation, double scale, float[:, ::1] out,
                         int n_threads, variant=None, *, const uint8_t[:, ::1] key_block_scales=None,
                         const double[::1] key_factors=None, const uint8_t[:, ::1] value_block_scales=None,
                         const double[::1] value_factors=None, float[::1] lse=None, extra_keys=()):
    """Softmax attention over MSE-coded keys and values in one pass, float32.

    ``out[q] = sum_i softmax_i(scale * <queries[q], k_i>) * v_i`` with
    ``k_i = key_norms[i] * key_centroids[key index(i, :)]`` and ``v_i`` alike,
    in the codes' rotated domains: ``queries`` are rotated like the keys, or
    are rotated here first as ``queries @ key_rotation``; ``out`` is in the
    values' domain, or is mapped back here as ``... @ value_rotation`` (both
    small products, :func:`small_product`). Block-scaled codes (either side)
    multiply coordinate ``j`` of row ``i`` by ``factors[k(i, j // 16)]`` too
    (include/tq_block.h). For each block of up to 16 queries, the
    scores and their maxima, then the softmax numerators (a float32
    exponential) and weighted sums are computed per chunk of rows in two
    parallel loops; chunk sums are combined in chunk order, so the result does
    not depend on the thread count. Codes of 1 to 8 bits (block-scaled: 1 to 4).

    Parameters
    ----------
    key_codes : (n, ceil(d*key_bits/8)) uint8
    key_bits, value_bits : int in 1..8 (1..4 with block scales)
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
    key_block_scales, value_block_scales : (n, ceil(ceil(d/16)*4/8)) uint8, optional
        4-bit factor indices per block of 16 coordinates; None for plain codes.
    key_factors, value_factors : (16,) float64, optional
        The factors, with the block scales.
    lse : (m,) float32, optional
        Written with ``log(sum_i exp(scale * <queries[q], k_i>))`` per query, so
        that the caller can merge this softmax with one over other rows.
    extra_keys : tuple of tuples, optional
        At most 3 more coded parts of every key, whose scores add to the first
        part's: each ``(codes (n, ceil(w*bits/8)) uint8, bits, centroids
        (2**bits,) float64, norms (n,) float32, norms2 (n,) float32 or None,
        factor, block_scales or None, block_factors or None, queries (m, w)
        float32)``, row ``i`` scaled by ``norms[i] * norms2[i] * factor``
        (outlier channels, the QJL signs of Prod codes). With extra parts the
        first part's width is ``queries.shape[1]`` (any) and ``key_rotation``
        must be None.
    """
    cdef int level = begin_call(variant)
    cdef Py_ssize_t n = key_codes.shape[0], m = queries.shape[0], d = out.shape[1], s
    cdef coded_rows keys[MAX_KEY_SIDES]
    cdef coded_rows values
    cdef int status, key_sides = 1 + len(extra_keys)
    if key_sides > MAX_KEY_SIDES:
        raise ValueError(f"at most {MAX_KEY_SIDES - 1} extra key parts, got {key_sides - 1}")
    if out.shape[0] != m or (key_sides == 1 and queries.shape[1] != d):
        raise ValueError(f"out must be ({m}, {queries.shape[1]}), got ({out.shape[0]}, {d})")
    if key_sides > 1 and key_rotation is not None:
        raise ValueError("a key rotation applies to one key part only")
    check_rotation(key_rotation, d)
    check_rotation(value_rotation, d)
    check_block_codes(key_block_scales, n, queries.shape[1])
    check_block_codes(value_block_scales, n, d)
    if lse is not None and lse.shape[0] != m:
        raise ValueError(f"lse must have {m} entries, got {lse.shape[0]}")
    out[:, :] = 0.0
    if lse is not None:
        lse[:] = -INFINITY
    if n == 0 or m == 0:
        return
    set_coded_rows(&keys[0], &key_codes[0, 0], &key_norms[0], key_codes.shape[1], key_bits, key_centroids,
                   NULL if key_block_scales is None else &key_block_scales[0, 0],
                   0 if key_block_scales is None else key_block_scales.shape[1], key_factors)
    keys[0].queries, keys[0].width = &queries[0, 0], queries.shape[1]
    for s in range(1, key_sides):
        set_key_part(&keys[s], extra_keys[s - 1], n, m)
    set_coded_rows(&values, &value_codes[0, 0], &value_norms[0], value_codes.shape[1], value_bits,
                   value_centroids, NULL if value_block_scales is None else &value_block_scales[0, 0],
                   0 if value_block_scales is None else value_block_scales.shape[1], value_factors)
    with nogil:
        status = attend_small_codes(keys, key_sides, &values, n, m, d,
                                    NULL if key_rotation is None else &key_rotation[0, 0],
                                    NULL if value_rotation is None else &value_rotation[0, 0],
                                    scale, &out[0, 0], NULL if lse is None else &lse[0], n_threads, level)
    if status < 0:
        raise MemoryError()


def small_code_attention_heads(const uintptr_t[::1] key_codes, const uintptr_t[::1] key_norms,
                               Py_ssize_t key_bytes, int key_bits, const double[::1] key_centroids,
                               const uintptr_t[::1] value_codes, const uintptr_t[::1] value_norms,
                               Py_ssize_t value_bytes, int value_bits, const double[::1] value_centroids,
                               Py_ssize_t n, const float[:, :, ::1] queries,
                               const uintptr_t[::1] key_rotations, const uintptr_t[::1] value_rotations,
                               double scale, float[:, :, ::1] out, int n_threads, variant=None, *,
                               const uintptr_t[::1] key_block_scales=None, Py_ssize_t key_block_bytes=0,
                               const double[::1] key_factors=None,
                               const uintptr_t[::1] value_block_scales=None, Py_ssize_t value_block_bytes=0,
                               const double[::1] value_factors=None, float[:, ::1] lse=None):
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
    key_bits, value_bits : int in 1..8 (1..4 with block scales)
    key_centroids, value_centroids : (2**bits,) float64
    n : int, rows per head
    queries : (heads, m, d) float32
    key_rotations, value_rotations : (heads,) uintptr or None
    scale : float
    out : (heads, m, d) float32, written
    n_threads : int >= 1
    variant : str, optional
        As for :func:`small_code_attention`.
    key_block_scales, value_block_scales : (heads,) uintptr, optional
        Addresses of every head's block-scale codes (``*_block_bytes`` per row).
    key_factors, value_factors : (16,) float64, optional
    lse : (heads, m) float32, optional
        Every head's log-sum-exp, as for :func:`small_code_attention`.
    """
    cdef int level = begin_call(variant)
    cdef Py_ssize_t heads = queries.shape[0], m = queries.shape[1], d = queries.shape[2], h
    cdef coded_rows* sides
    cdef coded_rows key_base, value_base
    cdef int failed = 0
    check_addresses(key_codes, heads)
    check_addresses(key_norms, heads)
    check_addresses(value_codes, heads)
    check_addresses(value_norms, heads)
    check_addresses(key_rotations, heads)
    check_addresses(value_rotations, heads)
    check_addresses(key_block_scales, heads)
    check_addresses(value_block_scales, heads)
    if lse is not None and (lse.shape[0] != heads or lse.shape[1] != m):
        raise ValueError(f"lse must be ({heads}, {m}), got ({lse.shape[0]}, {lse.shape[1]})")
    out[:, :, :] = 0.0
    if lse is not None:
        lse[:, :] = -INFINITY
    if n == 0 or m == 0 or heads == 0:
        return
    # The tables once; every head's sides are copies with its own pointers.
    set_coded_rows(&key_base, NULL, NULL, key_bytes, key_bits, key_centroids,
                   <const uint8_t*> (1 if key_block_scales is not None else 0), key_block_bytes, key_factors)
    set_coded_rows(&value_base, NULL, NULL, value_bytes, value_bits, value_centroids,
                   <const uint8_t*> (1 if value_block_scales is not None else 0), value_block_bytes,
                   value_factors)
    sides = <coded_rows*> malloc(2 * heads * sizeof(coded_rows))
    if sides == NULL:
        raise MemoryError()
    for h in range(heads):
        sides[2 * h] = key_base
        sides[2 * h].codes, sides[2 * h].norms = <const uint8_t*> key_codes[h], <const float*> key_norms[h]
        sides[2 * h].blocks = NULL if key_block_scales is None else <const uint8_t*> key_block_scales[h]
        sides[2 * h].queries, sides[2 * h].width = &queries[h, 0, 0], d
        sides[2 * h + 1] = value_base
        sides[2 * h + 1].codes = <const uint8_t*> value_codes[h]
        sides[2 * h + 1].norms = <const float*> value_norms[h]
        sides[2 * h + 1].blocks = NULL if value_block_scales is None else <const uint8_t*> value_block_scales[h]
    with nogil, parallel(num_threads=threads_for_codes(
            heads * n * m * (key_bytes + value_bytes + key_base.block_bytes + value_base.block_bytes),
            min(<Py_ssize_t> n_threads, heads))):
        tq_team_note()
        for h in prange(heads, schedule="dynamic"):
            if attend_small_codes(&sides[2 * h], 1, &sides[2 * h + 1], n, m, d,
                                  NULL if key_rotations is None else <const float*> key_rotations[h],
                                  NULL if value_rotations is None else <const float*> value_rotations[h],
                                  scale, &out[h, 0, 0], NULL if lse is None else &lse[h, 0], 1, level) < 0:
                failed += 1
    free(sides)
    if failed:
        raise MemoryError()


def merge_exact_rows(float[:, :, ::1] out, const float[:, ::1] lse, const float[:, :, ::1] queries,
                     const float[:, :, ::1] keys, const float[:, :, ::1] values, double scale,
                     const float[:, ::1] center=None):
    """Fold exact rows into the softmax of the fused attention kernels, in place, in float64.

    For every head ``h`` and query ``q``, ``out[h, q]`` (the kernel's output
    over the coded rows) and ``lse[h, q]`` (their log-sum-exp) become the
    softmax attention over the coded rows and the exact rows ``keys[h]``,
    ``values[h]`` together. A key center shifts the coded rows' logits by
    ``scale * <queries[h, q], center[h]>``.

    Parameters
    ----------
    out : (heads, m, d) float32, updated
    lse : (heads, m) float32
    queries : (heads, m, d) float32, unrotated
    keys, values : (heads, r, d) float32
    scale : float
    center : (heads, d) float32 or None
    """
    cdef Py_ssize_t heads = out.shape[0], m = out.shape[1], d = out.shape[2], r = keys.shape[1]
    cdef Py_ssize_t h, q, i, j
    cdef double coded, high, weight, total, dot
    if (lse.shape[0] != heads or lse.shape[1] != m or queries.shape[0] != heads or queries.shape[1] != m
            or queries.shape[2] != d or keys.shape[0] != heads or keys.shape[2] != d
            or values.shape[0] != heads or values.shape[1] != r or values.shape[2] != d
            or (center is not None and (center.shape[0] != heads or center.shape[1] != d))):
        raise ValueError("merge_exact_rows: out (heads, m, d), lse (heads, m), queries (heads, m, d), "
                         "keys and values (heads, r, d), center (heads, d)")
    if heads == 0 or m == 0 or d == 0:
        return
    cdef double* scratch = <double*> malloc((r + d) * sizeof(double))
    if scratch == NULL:
        raise MemoryError()
    cdef double* logits = scratch
    cdef double* acc = scratch + r
    with nogil:
        for h in range(heads):
            for q in range(m):
                coded = lse[h, q]
                if center is not None:
                    dot = 0.0
                    for j in range(d):
                        dot = dot + <double> queries[h, q, j] * center[h, j]
                    coded = coded + scale * dot
                high = coded
                for i in range(r):
                    dot = 0.0
                    for j in range(d):
                        dot = dot + <double> queries[h, q, j] * keys[h, i, j]
                    logits[i] = scale * dot
                    if logits[i] > high:
                        high = logits[i]
                weight = exp(coded - high)
                total = weight
                for j in range(d):
                    acc[j] = weight * out[h, q, j]
                for i in range(r):
                    weight = exp(logits[i] - high)
                    total = total + weight
                    for j in range(d):
                        acc[j] = acc[j] + weight * values[h, i, j]
                for j in range(d):
                    out[h, q, j] = <float> (acc[j] / total)
    free(scratch)
