# OpenMP facts and the kernel variant (included by _core.pyx).

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


