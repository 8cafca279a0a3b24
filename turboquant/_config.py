"""Build and runtime information."""

import os
import sys

import numpy as np

from ._kernels import _core
from ._version import __version__


def show_config(file=None):
    """Print turboquant's version, whether OpenMP is on and the thread count.

    Parameters
    ----------
    file : file-like, optional
        Where to print; ``sys.stdout`` by default.

    Returns
    -------
    dict
        The same facts: ``version``, ``openmp``, ``max_threads`` (OpenMP default
        team size, from ``OMP_NUM_THREADS``), ``num_procs``, ``wait_policy``
        (``OMP_WAIT_POLICY``; turboquant defaults it to ``PASSIVE``), ``kernels``
        (the instruction-set variant of the C kernels in use: ``"avx512"``,
        ``"avx2"`` or ``"portable"``), ``numpy``.
    """
    info = {
        "version": __version__,
        "openmp": _core.openmp_enabled(),
        "max_threads": _core.max_threads(),
        "num_procs": _core.num_procs(),
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "kernels": _core._kernel_variant(),
        "numpy": np.__version__,
    }
    stream = sys.stdout if file is None else file
    for key, value in info.items():
        print(f"{key:>12}: {value}", file=stream)
    return info
