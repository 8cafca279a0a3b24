# OpenMP facts, the kernel variant of each call and the record of the last call
# (included by _core.pyx).

import contextvars
import os
import warnings


def openmp_enabled():
    """Return True when the extension was compiled with OpenMP."""
    return bool(tq_openmp_enabled())


def max_threads():
    """Return the OpenMP default team size (follows ``OMP_NUM_THREADS``); 1 without OpenMP."""
    return tq_max_threads()


def num_procs():
    """Return the number of processors OpenMP sees; 1 without OpenMP."""
    return tq_num_procs()


def _last_team_size():
    """Largest OpenMP team the last kernel call made on this thread ran with.

    1 for a call that stayed serial (too little work, one thread asked for, or
    no OpenMP). For tests: it shows whether a call really ran in parallel.
    """
    return tq_last_team()


# Kernel variants (portable C, AVX2, AVX-512; see include/tq_tile.h). The
# quantization kernels give bit-identical results on every variant; the float32
# small-code kernels (include/tq_lut.h) round differently on each.
#
# The CPU is probed once, here, when the module is initialised. The environment
# variable TURBOQUANT_SIMD, read at the same time, caps the level for the whole
# process. A call runs the variant it is given, or else the current context's:
# the process level unless a ``with _use_kernel_variant(name):`` block in this
# thread (or asyncio task) says otherwise. Kernels receive it as an argument;
# no kernel reads shared mutable state to choose its code path.

_SIMD_VARIABLE = "TURBOQUANT_SIMD"
cdef int CPU_VARIANT = tq_best_variant()


def _process_variant(cap):
    """The process level for the value ``cap`` of ``TURBOQUANT_SIMD`` (None: unset).

    A cap above what the CPU runs leaves the CPU's level; an unknown name warns
    and is ignored.
    """
    names = [tq_variant_name(v).decode() for v in range(3)]
    if cap is None or cap == "":
        return CPU_VARIANT
    if cap.lower() not in names:
        warnings.warn(f"{_SIMD_VARIABLE}={cap!r} is not one of {names}; "
                      f"using {names[CPU_VARIANT]!r}", RuntimeWarning, stacklevel=2)
        return CPU_VARIANT
    return min(CPU_VARIANT, names.index(cap.lower()))


cdef int PROCESS_VARIANT = _process_variant(os.environ.get(_SIMD_VARIABLE))
_VARIANT_NUMBERS = {tq_variant_name(v).decode(): v for v in range(PROCESS_VARIANT + 1)}
_CONTEXT_VARIANT = contextvars.ContextVar("turboquant_kernel_variant", default=PROCESS_VARIANT)


cdef int variant_number(object name) except -1:
    """Number of the variant ``name`` (one of :func:`_kernel_variants`)."""
    try:
        return _VARIANT_NUMBERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"kernel variant must be one of {list(_VARIANT_NUMBERS)}, got {name!r}") from None


cdef int begin_call(object variant) except -1:
    """Start a kernel call: the number of the variant it runs (``variant``, or the
    context's for None), recorded with a team of 1 for this thread."""
    cdef int number = _CONTEXT_VARIANT.get() if variant is None else variant_number(variant)
    tq_call_begin(number)
    return number


def _kernel_variants():
    """Names of the kernel variants this process may run, the portable C one first.

    The CPU's best level, capped by ``TURBOQUANT_SIMD`` (``portable``, ``avx2``
    or ``avx512``) when it was set before turboquant was imported.
    """
    return list(_VARIANT_NUMBERS)


def _kernel_variant():
    """Name of the kernel variant calls in this thread and context run by default."""
    return tq_variant_name(_CONTEXT_VARIANT.get()).decode()


def _last_kernel_variant():
    """Name of the variant the last kernel call made on this thread ran, or None
    when that kernel has a single implementation (or no kernel ran yet)."""
    number = tq_last_variant()
    return None if number < 0 else tq_variant_name(number).decode()


class _use_kernel_variant:
    """``with _use_kernel_variant(name):`` runs kernels on variant ``name`` in this block.

    Only calls made in the current thread (or asyncio task) within the block
    are affected, so threads may use different variants at the same time. For
    tests and benchmarks.

    Parameters
    ----------
    name : str
        One of :func:`_kernel_variants`.

    Raises
    ------
    ValueError
        If this process cannot run ``name``.
    """

    def __init__(self, name):
        self.name = name
        self._number = variant_number(name)
        self._tokens = []

    def __enter__(self):
        self._tokens.append(_CONTEXT_VARIANT.set(self._number))
        return self.name

    def __exit__(self, *exc_info):
        _CONTEXT_VARIANT.reset(self._tokens.pop())
