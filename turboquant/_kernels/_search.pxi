# Nearest-neighbour scans of packed codes with bounded heaps: the fast scan of
# 1, 2 and 4-bit codes in the block layout of include/tq_scan.h and the float32
# scan of row-packed codes of any width (included by _core.pyx).

# Blocks (32 rows each) per parallel work item of the fast scan.
DEF SCAN_CHUNK_BLOCKS = 64
# Below this many (query, row, nibble) lookups (about 0.2 ms on one AVX2 core)
# waking a second thread costs more than it saves.
DEF SCAN_MIN_PARALLEL = 1 << 23
# Rows per work item of the row scan (a multiple of the heaps' refill cost).
DEF ROW_SCAN_ROWS = 1024


def scan_nibbles(Py_ssize_t d, int bits):
    """Nibbles (padded to a multiple of 4) of a ``bits``-bit row of ``d`` coordinates in
    the fast-scan block layout; a block of 32 rows takes ``16 * nibbles`` bytes."""
    if bits not in (1, 2, 4):
        raise ValueError(f"the fast scan takes 1, 2 or 4-bit codes, got {bits}")
    return tq_scan_nibbles(d, bits)


def scan_pack(const uint8_t[:, ::1] rows, uint8_t[:, ::1] blocks, Py_ssize_t first):
    """Write packed ``rows`` at positions ``first ..`` of the block layout ``blocks``
    ((n_blocks, 16 * nibbles) uint8, zero where never written)."""
    cdef Py_ssize_t nibbles = blocks.shape[1] // 16, count = rows.shape[0]
    if blocks.shape[1] % 64 or (first + count + TQ_SCAN_BLOCK - 1) // TQ_SCAN_BLOCK > blocks.shape[0]:
        raise ValueError("blocks has too few blocks or a row size that is not 16 * a multiple of 4 nibbles")
    if count == 0:
        return
    with nogil:
        tq_scan_pack(&rows[0, 0], count, rows.shape[1], nibbles, &blocks[0, 0], first)


def scan_unpack(const uint8_t[:, ::1] blocks, const int64_t[::1] positions, uint8_t[:, ::1] rows):
    """The packed rows at ``positions`` of the block layout, into ``rows`` (count, row_bytes)."""
    cdef Py_ssize_t nibbles = blocks.shape[1] // 16, count = positions.shape[0], i
    if rows.shape[0] != count:
        raise ValueError("rows must have one row per position")
    for i in range(count):
        if not 0 <= positions[i] < blocks.shape[0] * TQ_SCAN_BLOCK:
            raise ValueError(f"position {positions[i]} is outside the blocks")
    if count == 0:
        return
    with nogil:
        tq_scan_unpack(&blocks[0, 0], nibbles, &positions[0], count, rows.shape[1], &rows[0, 0])


cdef int check_search_output(Py_ssize_t m, Py_ssize_t n, const float[::1] scale, const float[::1] offset,
                             const int64_t[::1] ids, double[:, ::1] out_keys,
                             int64_t[:, ::1] out_positions) except -1:
    if scale.shape[0] != n or ids.shape[0] != n or offset.shape[0] not in (0, n):
        raise ValueError("scale and ids need n entries, offset n or 0")
    if out_keys.shape[0] != m or out_positions.shape[0] != m or out_keys.shape[1] != out_positions.shape[1]:
        raise ValueError("out_keys and out_positions must both be (m, k)")
    return 0


cdef void heaps_to_output(tq_heap* heaps, Py_ssize_t q, Py_ssize_t team, Py_ssize_t m,
                          tq_heap* final, double[:, ::1] out_keys, int64_t[:, ::1] out_positions) noexcept nogil:
    """Merge query ``q``'s per-thread heaps (``heaps[t * m + q]``) into ``final``
    and write it best first; rows past its size get -inf and position -1."""
    cdef Py_ssize_t t, i, k = out_keys.shape[1]
    final.size = 0
    for t in range(team):
        for i in range(heaps[t * m + q].size):
            tq_heap_offer(final, heaps[t * m + q].items[i])
    tq_heap_sort(final)
    for i in range(k):
        if i < final.size:
            out_keys[q, i] = final.items[i].key
            out_positions[q, i] = final.items[i].position
        else:
            out_keys[q, i] = -INFINITY
            out_positions[q, i] = -1


cdef tq_candidate* alloc_heaps(tq_heap* heaps, Py_ssize_t count, Py_ssize_t capacity) except NULL:
    cdef tq_candidate* items = <tq_candidate*> malloc(max(1, count * capacity) * sizeof(tq_candidate))
    cdef Py_ssize_t h
    if items == NULL:
        raise MemoryError()
    for h in range(count):
        heaps[h].items = items + h * capacity
        heaps[h].size = 0
        heaps[h].capacity = capacity
    return items


def fast_scan_search(const uint8_t[:, ::1] blocks, Py_ssize_t n, int bits, const double[::1] centroids,
                     const float[:, ::1] queries, const float[::1] scale, const float[::1] offset,
                     const float[:, ::1] block_terms, const int64_t[::1] ids, Py_ssize_t candidates,
                     double[:, ::1] out_keys,
                     int64_t[:, ::1] out_positions, int n_threads, variant=None):
    """The best rows of 1, 2 or 4-bit codes in the block layout for each query.

    Every row ``i`` has the key ``scale[i] * ip + offset[i]`` (offset empty: 0), ip
    the inner product of the query with the row's centroids. The scan keeps the
    ``candidates`` best rows by an approximate key from uint8 tables summed in
    integers (identical on every variant), rescores those exactly with float64
    tables, and writes the best ``k`` by exact key (ties: smaller id) to
    ``out_keys`` / ``out_positions`` (m, k), best first, -inf / -1 past ``n``.
    The result does not depend on the thread count or on which thread scanned what.

    Parameters
    ----------
    blocks : (ceil(n / 32) or more, 16 * nibbles) uint8, the block layout
    n : int, rows held
    bits : 1, 2 or 4
    centroids : (2**bits,) float64
    queries : (m, d) float32, in the codes' rotated domain
    scale, ids : (n,) float32 / int64; offset : (n,) or (0,) float32
    block_terms : (ceil(n / 32), 3) float32
        Per block of 32 rows: the least and largest ``scale`` and the largest
        ``offset`` (0 without offsets) of its rows; the scan skips a block
        whose keys these bound below the heap's threshold.
    candidates : int >= k
    out_keys : (m, k) float64; out_positions : (m, k) int64
    n_threads : int >= 1
    """
    cdef int level = begin_call(variant)
    cdef Py_ssize_t m = queries.shape[0], d = queries.shape[1], k = out_keys.shape[1]
    cdef Py_ssize_t nibbles = blocks.shape[1] // 16, table_bytes = 16 * nibbles
    cdef Py_ssize_t n_blocks = (n + TQ_SCAN_BLOCK - 1) // TQ_SCAN_BLOCK, n_chunks, c, q, i, team
    cdef const float* offsets = NULL
    cdef tq_heap* heaps = NULL
    cdef tq_heap final
    cdef tq_candidate* items = NULL
    cdef tq_candidate* final_items = NULL
    cdef uint8_t* tables = NULL
    cdef double* exact = NULL
    cdef double* steps = NULL
    cdef double* biases = NULL
    cdef tq_candidate cand
    check_search_output(m, n, scale, offset, ids, out_keys, out_positions)
    if bits not in (1, 2, 4) or centroids.shape[0] != (1 << bits) or nibbles != tq_scan_nibbles(d, bits):
        raise ValueError("blocks, bits, centroids and the query width do not match")
    if blocks.shape[0] < n_blocks or candidates < k:
        raise ValueError("blocks holds fewer than n rows, or candidates < k")
    if block_terms.shape[0] != n_blocks or block_terms.shape[1] != 3:
        raise ValueError("block_terms must be (ceil(n / 32), 3)")
    if m == 0:
        return
    if offset.shape[0]:
        offsets = &offset[0]
    n_chunks = (n_blocks + SCAN_CHUNK_BLOCKS - 1) // SCAN_CHUNK_BLOCKS
    team = 1 if n * m * nibbles < SCAN_MIN_PARALLEL else min(<Py_ssize_t> n_threads, max(1, n_chunks))
    heaps = <tq_heap*> malloc((team * m + 1) * sizeof(tq_heap))
    tables = <uint8_t*> malloc(m * table_bytes + 1)
    exact = <double*> malloc((m * table_bytes + 1) * sizeof(double))
    steps = <double*> malloc((2 * m + 1) * sizeof(double))
    try:
        if heaps == NULL or tables == NULL or exact == NULL or steps == NULL:
            raise MemoryError()
        biases = steps + m
        items = alloc_heaps(heaps, team * m, candidates)
        final_items = alloc_heaps(&final, 1, candidates)
        with nogil:
            for q in range(m):
                tq_scan_tables(&queries[q, 0], d, bits, &centroids[0], nibbles, exact + q * table_bytes,
                               tables + q * table_bytes, &steps[q], &biases[q])
            if n > 0:
                with parallel(num_threads=team):
                    tq_team_note()
                    for c in prange(n_chunks, schedule="dynamic"):
                        tq_scan_blocks(level, &blocks[0, 0], nibbles, n, c * SCAN_CHUNK_BLOCKS,
                                       min(n_blocks, (c + 1) * SCAN_CHUNK_BLOCKS), tables, steps, biases, m,
                                       &scale[0], offsets, &block_terms[0, 0], &ids[0],
                                       heaps + tq_thread_num() * m)
            for q in range(m):
                # Rescore this query's candidates exactly into the first team heap,
                # then merge that one alone.
                final.size = 0
                for c in range(team):
                    for i in range(heaps[c * m + q].size):
                        tq_heap_offer(&final, heaps[c * m + q].items[i])
                heaps[q].size = 0
                heaps[q].capacity = k
                for i in range(final.size):
                    cand = final.items[i]
                    cand.key = scale[cand.position] * tq_scan_exact(&blocks[0, 0], nibbles, cand.position,
                                                                     exact + q * table_bytes)
                    if offsets != NULL:
                        cand.key = cand.key + offsets[cand.position]
                    tq_heap_offer(&heaps[q], cand)
                heaps_to_output(heaps, q, 1, m, &final, out_keys, out_positions)
    finally:
        free(heaps)
        free(tables)
        free(exact)
        free(steps)
        free(items)
        free(final_items)


def row_scan_search(const uint8_t[:, ::1] codes, Py_ssize_t n, int bits, const double[::1] centroids,
                    const float[:, ::1] queries, const float[::1] scale, const float[::1] offset,
                    const int64_t[::1] ids, double[:, ::1] out_keys, int64_t[:, ::1] out_positions,
                    int n_threads, variant=None):
    """The best ``k`` rows of row-packed codes (any width 1..8) for each query.

    The keys of :func:`fast_scan_search`, with ip the float32 score of the fused
    decoder of ``include/tq_lut.h``; rows in work items of 1024, up to
    TQ_LUT_MAX_QUERIES queries per pass, no (m, n) matrix. Same output and
    thread-count independence.

    Parameters
    ----------
    codes : (n or more, ceil(d * bits / 8)) uint8; rows past ``n`` are ignored
    (other parameters as in :func:`fast_scan_search`)
    """
    cdef int level = begin_call(variant)
    cdef Py_ssize_t m = queries.shape[0], d = queries.shape[1], k = out_keys.shape[1]
    cdef Py_ssize_t row_bytes = codes.shape[1], n_chunks = (n + ROW_SCAN_ROWS - 1) // ROW_SCAN_ROWS
    cdef Py_ssize_t c, q, q0, i, start, rows, team, per_thread = ROW_SCAN_ROWS * (TQ_LUT_MAX_QUERIES + 2)
    cdef float cents[1 << TQ_LUT_MAX_BITS]
    cdef const float* offsets = NULL
    cdef tq_heap* heaps = NULL
    cdef tq_heap final
    cdef tq_candidate* items = NULL
    cdef tq_candidate* final_items = NULL
    cdef char* scratch = NULL
    cdef float* scores
    cdef double* row_scales
    cdef tq_heap* heap
    cdef double key
    check_search_output(m, n, scale, offset, ids, out_keys, out_positions)
    if not 1 <= bits <= 8 or centroids.shape[0] != (1 << bits) or row_bytes != (d * bits + 7) // 8:
        raise ValueError("codes, bits, centroids and the query width do not match")
    if codes.shape[0] < n:
        raise ValueError("codes holds fewer than n rows")
    if m == 0:
        return
    if offset.shape[0]:
        offsets = &offset[0]
    centroids_f32(centroids, bits, cents)
    team = threads_for_codes(n * m * row_bytes, min(<Py_ssize_t> n_threads, max(1, n_chunks)))
    heaps = <tq_heap*> malloc((team * m + 1) * sizeof(tq_heap))
    scratch = <char*> malloc(team * per_thread * sizeof(double) + 64)
    try:
        if heaps == NULL or scratch == NULL:
            raise MemoryError()
        items = alloc_heaps(heaps, team * m, k)
        final_items = alloc_heaps(&final, 1, k)
        with nogil:
            if n > 0:
                with parallel(num_threads=team):
                    tq_team_note()
                    row_scales = <double*> scratch_start(scratch) + tq_thread_num() * per_thread
                    scores = <float*> (row_scales + ROW_SCAN_ROWS)
                    for c in prange(n_chunks, schedule="dynamic"):
                        start = c * ROW_SCAN_ROWS
                        rows = min(<Py_ssize_t> ROW_SCAN_ROWS, n - start)
                        for i in range(rows):
                            row_scales[i] = scale[start + i]
                        q0 = 0
                        while q0 < m:
                            tq_lut_scores(level, &codes[start, 0], rows, row_bytes, bits, cents, &queries[q0, 0],
                                          min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, m - q0), d, row_scales,
                                          scores, ROW_SCAN_ROWS, 0, NULL)
                            for q in range(min(<Py_ssize_t> TQ_LUT_MAX_QUERIES, m - q0)):
                                heap = heaps + tq_thread_num() * m + q0 + q
                                for i in range(rows):
                                    key = scores[q * ROW_SCAN_ROWS + i]
                                    if offsets != NULL:
                                        key = key + offsets[start + i]
                                    if key >= tq_heap_threshold(heap):
                                        tq_heap_offer_row(heap, key, ids[start + i], start + i)
                            q0 = q0 + TQ_LUT_MAX_QUERIES
            for q in range(m):
                heaps_to_output(heaps, q, team, m, &final, out_keys, out_positions)
    finally:
        free(heaps)
        free(scratch)
        free(items)
        free(final_items)
