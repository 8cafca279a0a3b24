"""Build and runtime information."""

import os
import sys

import numpy as np

from ._kernels import _core
from ._version import __version__

# The OpenMP runtime reads OMP_WAIT_POLICY once, when it is loaded: with the
# extension, just before this module runs (unless another library loaded it
# earlier). Changing the variable later has no effect, so report this value.
_WAIT_POLICY_AT_IMPORT = os.environ.get("OMP_WAIT_POLICY", "")
_WAIT_POLICY_UNSET = ("unset (the OpenMP runtime's default; OMP_WAIT_POLICY=PASSIVE before starting "
                      "Python is recommended when numpy's BLAS threads share the cores)")


def show_config(file=None):
    """Print turboquant's version, whether OpenMP is on, the thread count and the kernels.

    Parameters
    ----------
    file : file-like, optional
        Where to print; ``sys.stdout`` by default.

    Returns
    -------
    dict
        The same facts: ``version``, ``openmp``, ``max_threads`` (OpenMP default
        team size, from ``OMP_NUM_THREADS``), ``num_procs``, ``wait_policy``,
        ``kernels`` (the instruction-set variant of the C kernels in use:
        ``"avx512"``, ``"avx2"`` or ``"portable"``), ``numpy``.

    Notes
    -----
    ``wait_policy`` is ``OMP_WAIT_POLICY`` as it was when turboquant was
    imported, which is when the OpenMP runtime reads it. turboquant never sets
    it. On machines where numpy's BLAS threads share the cores with the kernels'
    OpenMP threads, set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python: idle
    OpenMP workers then sleep instead of spinning, and spinning workers can make
    the calls that alternate kernels with BLAS several times slower.

    ``kernels`` is the fastest variant the CPU runs, probed once at import and
    capped by ``TURBOQUANT_SIMD`` (``portable``, ``avx2`` or ``avx512``) if
    that was set before the import; an unknown value warns and is ignored.
    """
    info = {
        "version": __version__,
        "openmp": _core.openmp_enabled(),
        "max_threads": _core.max_threads(),
        "num_procs": _core.num_procs(),
        "wait_policy": _WAIT_POLICY_AT_IMPORT or _WAIT_POLICY_UNSET,
        "kernels": _core._kernel_variant(),
        "numpy": np.__version__,
    }
    stream = sys.stdout if file is None else file
    for key, value in info.items():
        print(f"{key:>12}: {value}", file=stream)
    return info
