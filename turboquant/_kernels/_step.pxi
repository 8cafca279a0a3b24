# Rotations and codes of a few rows per head, every head of a layer in one call
# (included by _core.pyx). Head h has its own rotation, at an address of the
# caller's: a (d, d) float32 small-product operand (``block == 0``) or the
# (rounds, d) float64 signs of a randomized Hadamard rotation (``block > 0``).
# Each head's rows get exactly the bits of the single-head kernels
# (small_product, hadamard_rotate, small_dense_quantize_pack,
# hadamard_quantize_pack), whatever the thread count.


cdef inline Py_ssize_t aligned_count(Py_ssize_t count, Py_ssize_t item) noexcept nogil:
    """``count`` items of ``item`` bytes, rounded up to a multiple of 64 bytes (in items)."""
    return ((count * item + 63) // 64) * 64 // item


cdef check_head_rows(const uintptr_t[::1] rotations, Py_ssize_t heads, Py_ssize_t rounds, Py_ssize_t block,
                     Py_ssize_t d):
    if rotations.shape[0] != heads:
        raise ValueError(f"expected {heads} rotation addresses, got {rotations.shape[0]}")
    if block and not (rounds >= 1 and d // 2 < block <= d and (block & (block - 1)) == 0):
        raise ValueError(f"a Hadamard rotation of dim {d} needs rounds >= 1 and a power-of-two block in "
                         f"({d // 2}, {d}], got rounds={rounds}, block={block}")


def rotate_heads(const float[:, :, ::1] x, const uintptr_t[::1] rotations, Py_ssize_t rounds,
                 Py_ssize_t block, bint inverse, float[:, :, ::1] out, int n_threads, variant=None):
    """Rotate the rows of every head with that head's rotation.

    ``out[h] = x[h] @ B_h`` with the (d, d) float32 operand ``B_h`` at
    ``rotations[h]`` (``block == 0``, :func:`small_product`), or the randomized
    Hadamard rotation with the (rounds, d) float64 signs at ``rotations[h]``
    (``block > 0``; its inverse when ``inverse``, :func:`hadamard_rotate`).
    Heads are spread over the team; each head's rows are rotated as the
    single-head kernel rotates them, so the bits do not depend on the thread
    count. The caller keeps the arrays behind the addresses alive.

    Parameters
    ----------
    x : (heads, m, d) float32
    rotations : (heads,) uintptr
    rounds, block : int
        The Hadamard rounds and block (block 0 for dense operands).
    inverse : bool
        Hadamard only (a dense operand is the matrix wanted).
    out : (heads, m, d) float32, written (may not alias ``x``)
    n_threads : int >= 1
    variant : str, optional
        Kernel variant (one of ``_kernel_variants()``); the context's by default.
    """
    cdef Py_ssize_t heads = x.shape[0], m = x.shape[1], d = x.shape[2], h, t, first, count
    cdef Py_ssize_t n_tiles = (m + TQ_TILE - 1) // TQ_TILE
    cdef Py_ssize_t tile_doubles = aligned_count(TQ_TILE * d, sizeof(double)) if block else 0
    cdef int level = begin_call(variant)
    cdef int team
    cdef double* tile = NULL
    cdef void* scratch
    check_head_rows(rotations, heads, rounds, block, d)
    if out.shape[0] != heads or out.shape[1] != m or out.shape[2] != d:
        raise ValueError(f"out must be ({heads}, {m}, {d})")
    if heads == 0 or m == 0:
        return
    team = threads_for(heads * m * d * (d if not block else 4 * rounds), min(<Py_ssize_t> n_threads, heads))
    scratch = malloc(team * tile_doubles * sizeof(double) + 64)
    if scratch == NULL:
        raise MemoryError()
    try:
        with nogil, parallel(num_threads=team):
            tq_team_note()
            tile = <double*> scratch_start(scratch) + tq_thread_num() * tile_doubles
            for h in prange(heads, schedule="static"):
                if not block:
                    tq_small_product_f(level, &x[h, 0, 0], m, d, <const float*> rotations[h], &out[h, 0, 0])
                else:
                    for t in range(n_tiles):
                        first = t * TQ_TILE
                        count = min(<Py_ssize_t> TQ_TILE, m - first)
                        tq_hadamard_rotate_f(level, &x[h, first, 0], &out[h, first, 0], count, d,
                                             <const double*> rotations[h], rounds, block, inverse, tile)
    finally:
        free(scratch)


def quantize_heads(const float[:, :, ::1] x, const uintptr_t[::1] rotations, Py_ssize_t rounds,
                   Py_ssize_t block, const double[::1] boundaries, const double[::1] centroids, int bits,
                   double[:, ::1] norms, uint8_t[:, :, ::1] codes, int n_threads, variant=None):
    """MSE codes of the rows of every head, each rotated by its head's rotation.

    Head ``h``'s rows get the norms and codes of :func:`small_dense_quantize_pack`
    with the (d, d) float32 operand at ``rotations[h]`` (``block == 0``), or of
    :func:`hadamard_quantize_pack` with the (rounds, d) float64 signs at
    ``rotations[h]`` (``block > 0``), float32 rows: the same bits, whatever the
    thread count. Every head shares the codebook.

    Parameters
    ----------
    x : (heads, m, d) float32
    rotations : (heads,) uintptr
    rounds, block : int
        As for :func:`rotate_heads`.
    boundaries : (2**bits - 1,) float64
    centroids : (2**bits,) float64
    bits : int in 1..8
    norms : (heads, m) float64, written
    codes : (heads, m, ceil(d*bits/8)) uint8, written
    n_threads : int >= 1
    variant : str, optional
        As for :func:`rotate_heads`.
    """
    cdef Py_ssize_t heads = x.shape[0], m = x.shape[1], d = x.shape[2], row_bytes = codes.shape[2]
    cdef Py_ssize_t n_bounds = boundaries.shape[0], h, i, t, first, count, k
    cdef Py_ssize_t n_tiles = (m + TQ_TILE - 1) // TQ_TILE
    # Per thread: the rotated rows and a quantizer tile (dense), or a float32
    # tile (Hadamard); shared: float32 signs of every head and boundaries (Hadamard).
    cdef Py_ssize_t rotated_floats = aligned_count(m * d, sizeof(float)) if not block else 0
    cdef Py_ssize_t tile_bytes = (aligned_count(TQ_TILE * min(d, <Py_ssize_t> TQ_CHUNK), sizeof(double))
                                  * sizeof(double) if not block else
                                  aligned_count(TQ_TILE * d, sizeof(float)) * sizeof(float))
    cdef Py_ssize_t per_thread = rotated_floats * sizeof(float) + tile_bytes
    cdef Py_ssize_t shared = (heads * rounds * d + n_bounds) * sizeof(float) if block else 0
    cdef int level = begin_call(variant)
    cdef int team
    cdef char* mine
    cdef float* rotated
    cdef float* signs32 = NULL
    cdef float* bounds32 = NULL
    cdef char* scratch
    check_head_rows(rotations, heads, rounds, block, d)
    if (norms.shape[0] != heads or norms.shape[1] != m or codes.shape[0] != heads or codes.shape[1] != m
            or row_bytes != (d * bits + 7) // 8):
        raise ValueError(f"norms must be ({heads}, {m}) and codes ({heads}, {m}, {(d * bits + 7) // 8})")
    if not 1 <= bits <= 8 or boundaries.shape[0] != (1 << bits) - 1 or centroids.shape[0] != (1 << bits):
        raise ValueError(f"bits={bits} needs 2**bits - 1 boundaries and 2**bits centroids")
    if heads == 0 or m == 0:
        return
    team = threads_for(heads * m * d * (d if not block else 4 * rounds), min(<Py_ssize_t> n_threads, heads))
    scratch = <char*> malloc(team * per_thread + shared + 64)
    if scratch == NULL:
        raise MemoryError()
    try:
        if block:
            signs32 = <float*> (<char*> scratch_start(scratch) + team * per_thread)
            bounds32 = signs32 + heads * rounds * d
            for h in range(heads):
                for k in range(rounds * d):
                    signs32[h * rounds * d + k] = <float> (<const double*> rotations[h])[k]
            for k in range(n_bounds):
                bounds32[k] = tq_float_bound(boundaries[k])
        with nogil, parallel(num_threads=team):
            tq_team_note()
            mine = <char*> scratch_start(scratch) + tq_thread_num() * per_thread
            rotated = <float*> mine
            for h in prange(heads, schedule="static"):
                if not block:
                    for i in range(m):
                        norms[h, i] = row_norm(&x[h, i, 0], d)
                    tq_small_product_f(level, &x[h, 0, 0], m, d, <const float*> rotations[h], rotated)
                    for t in range(n_tiles):
                        first = t * TQ_TILE
                        count = min(<Py_ssize_t> TQ_TILE, m - first)
                        tq_quantize_rows_f(level, rotated + first * d, count, d, &norms[h, first],
                                           &boundaries[0], bits, &centroids[0], &codes[h, first, 0],
                                           row_bytes, NULL, <double*> (mine + rotated_floats * sizeof(float)))
                else:
                    for t in range(n_tiles):
                        first = t * TQ_TILE
                        count = min(<Py_ssize_t> TQ_TILE, m - first)
                        tq_hadamard_quantize_f(level, &x[h, first, 0], count, d, signs32 + h * rounds * d,
                                               rounds, block, bounds32, bits, &centroids[0], &norms[h, first],
                                               &codes[h, first, 0], row_bytes, NULL, <float*> mine)
    finally:
        free(scratch)


def small_code_attention_ragged(const uintptr_t[::1] key_codes, const uintptr_t[::1] key_norms,
                                Py_ssize_t key_bytes, int key_bits, const double[::1] key_centroids,
                                const uintptr_t[::1] value_codes, const uintptr_t[::1] value_norms,
                                Py_ssize_t value_bytes, int value_bits, const double[::1] value_centroids,
                                const Py_ssize_t[::1] lengths, const float[:, :, ::1] queries,
                                const uintptr_t[::1] key_rotations, const uintptr_t[::1] value_rotations,
                                double scale, float[:, :, ::1] out, int n_threads, variant=None, *,
                                const uintptr_t[::1] key_block_scales=None, Py_ssize_t key_block_bytes=0,
                                const double[::1] key_factors=None,
                                const uintptr_t[::1] value_block_scales=None, Py_ssize_t value_block_bytes=0,
                                const double[::1] value_factors=None, float[:, ::1] lse=None):
    """:func:`small_code_attention_heads` with a number of rows per head.

    Head ``h`` attends over its own ``lengths[h]`` rows (a head with none gets
    zeros, and a log-sum-exp of -inf), so the heads of several caches of
    different lengths (the rows of a batch) run in one call. Each head's result
    is :func:`small_code_attention_heads`'s for that head, whatever the thread
    count. The parameters are those of :func:`small_code_attention_heads`,
    with ``lengths`` in place of ``n``:

    Parameters
    ----------
    lengths : (heads,) intp
        Rows of every head, >= 0.
    """
    cdef int level = begin_call(variant)
    cdef Py_ssize_t heads = queries.shape[0], m = queries.shape[1], d = queries.shape[2], h, rows = 0
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
    if lengths.shape[0] != heads:
        raise ValueError(f"expected {heads} lengths, got {lengths.shape[0]}")
    for h in range(heads):
        if lengths[h] < 0:
            raise ValueError(f"lengths must be >= 0, got {lengths[h]}")
        rows += lengths[h]
    if out.shape[0] != heads or out.shape[1] != m or out.shape[2] != d:
        raise ValueError(f"out must be ({heads}, {m}, {d})")
    if lse is not None and (lse.shape[0] != heads or lse.shape[1] != m):
        raise ValueError(f"lse must be ({heads}, {m}), got ({lse.shape[0]}, {lse.shape[1]})")
    out[:, :, :] = 0.0
    if lse is not None:
        lse[:, :] = -INFINITY
    if rows == 0 or m == 0:
        return
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
            rows * m * (key_bytes + value_bytes + key_base.block_bytes + value_base.block_bytes),
            min(<Py_ssize_t> n_threads, heads))):
        tq_team_note()
        for h in prange(heads, schedule="dynamic"):
            if lengths[h] == 0:
                continue
            if attend_small_codes(&sides[2 * h], 1, &sides[2 * h + 1], lengths[h], m, d,
                                  NULL if key_rotations is None else <const float*> key_rotations[h],
                                  NULL if value_rotations is None else <const float*> value_rotations[h],
                                  scale, &out[h, 0, 0], NULL if lse is None else &lse[h, 0], 1, level) < 0:
                failed += 1
    free(sides)
    if failed:
        raise MemoryError()
