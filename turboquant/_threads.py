"""The one place where ``n_threads`` arguments are interpreted."""

import operator

from ._kernels import _core
from ._errors import InvalidParameterError


def resolve_n_threads(n_threads=None):
    """Turn a public ``n_threads`` argument into a positive thread count.

    Parameters
    ----------
    n_threads : int or None, default=None
        ``None`` uses the OpenMP default team size, so ``OMP_NUM_THREADS`` and
        threadpoolctl apply; ``-1`` uses every processor; ``-k`` uses all but
        ``k - 1`` of them (at least one); a positive ``k`` uses exactly ``k``.

    Returns
    -------
    int
        At least 1. Without OpenMP every kernel runs serially whatever this says.

    Raises
    ------
    InvalidParameterError
        If ``n_threads`` is 0 or not an integer.

    Notes
    -----
    turboquant leaves the OpenMP environment alone. Where numpy's BLAS threads
    share the cores with the kernels' OpenMP threads, setting
    ``OMP_WAIT_POLICY=PASSIVE`` before starting Python is recommended: idle
    OpenMP workers then sleep instead of spinning on the cores BLAS needs.
    :func:`show_config` reports the policy in effect.
    """
    if n_threads is None:
        return max(1, _core.max_threads())
    if isinstance(n_threads, bool):
        raise InvalidParameterError(f"n_threads must be an integer or None, got {n_threads!r}")
    try:
        count = operator.index(n_threads)
    except TypeError:
        raise InvalidParameterError(
            f"n_threads must be an integer or None, got {n_threads!r}"
        ) from None
    if count == 0:
        raise InvalidParameterError("n_threads must not be 0 (use None for the default)")
    if count < 0:
        return max(1, _core.num_procs() + 1 + count)
    return count
