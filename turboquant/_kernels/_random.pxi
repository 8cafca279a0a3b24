# Machine-independent standard normals and Haar rotations (included by _core.pyx;
# include/tq_random.h). Single-threaded: they run once per rotation or sketch.

def standard_normal_from_raw(const uint64_t[::1] words, double[::1] out, Py_ssize_t filled):
    """Continue filling ``out`` with standard normals from raw 64-bit words.

    Marsaglia's polar method on consecutive pairs of words (see
    include/tq_random.h), with a logarithm made of ``+ - * /`` only, so the
    values are the same bits on every IEEE-754 machine.

    Parameters
    ----------
    words : (n_words,) uint64, C-contiguous, ``n_words`` even
        The next words of the stream; all are consumed unless ``out`` fills up.
    out : (n,) float64, C-contiguous
        ``out[filled:]`` is written as far as the words go.
    filled : int, ``0 <= filled <= n``
        Values already in ``out``.

    Returns
    -------
    int
        The new number of values in ``out``.
    """
    cdef Py_ssize_t n_words = words.shape[0], n = out.shape[0]
    if n_words % 2 or not 0 <= filled <= n:
        raise ValueError(f"need an even number of words and 0 <= filled <= {n}, "
                         f"got {n_words} words and filled={filled}")
    if n_words == 0 or filled == n:
        return filled
    with nogil:
        filled += tq_standard_normal_from_raw(&words[0], n_words, &out[filled], n - filled)
    return filled


def haar_orthogonal(double[:, ::1] a, variant=None):
    """Replace the square matrix ``a`` by ``Q diag(sign(diag(R)))``, ``a = Q R`` its QR.

    Householder reflections in a fixed order with element-wise inner loops
    (include/tq_random.h): the same bits on every IEEE-754 machine and for every
    kernel variant. For a matrix of i.i.d. standard normals the result is
    Haar-distributed on the orthogonal group.

    Parameters
    ----------
    a : (d, d) float64, C-contiguous, overwritten
    variant : str, optional
        Kernel variant (default: this context's); every variant gives the same bits.
    """
    cdef Py_ssize_t d = a.shape[0]
    cdef int level = begin_call(variant)
    if a.shape[1] != d:
        raise ValueError(f"a has shape ({d}, {a.shape[1]}); expected a square matrix")
    if d == 0:
        return
    cdef double* work = <double*> malloc(4 * d * sizeof(double))
    if work == NULL:
        raise MemoryError()
    with nogil:
        tq_haar_orthogonal(level, &a[0, 0], d, work)
    free(work)
