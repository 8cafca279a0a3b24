"""Input checking shared by every public entry point.

Arrays are converted once, here, to C-contiguous float32 or float64; everything
behind this boundary may assume it.
"""

import numbers
import operator

import numpy as np

from ._errors import DTypeError, InvalidParameterError, NonFiniteError, ShapeError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FLOAT32_MAX = float(np.finfo(np.float32).max)


def readonly(array):
    """Mark ``array`` read-only and return it (state objects store inputs this way)."""
    array.setflags(write=False)
    return array


def check_int(value, name, *, low=None, high=None):
    """Return ``value`` as a Python int, checking type and range (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    value = operator.index(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            expected = f">= {low}"
        elif low is None:
            expected = f"<= {high}"
        else:
            expected = f"in {low}..{high}"
        raise InvalidParameterError(f"{name} must be an integer {expected}, got {value}")
    return value


def check_float_dtype(dtype, name="dtype"):
    """``dtype`` as float32 or float64 (InvalidParameterError for anything else)."""
    try:
        dtype = np.dtype(dtype)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dtype not in FLOAT_DTYPES:
        raise InvalidParameterError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


def check_bool(value, name):
    """Return ``value`` as a bool when it is a Python or numpy bool, else raise."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidParameterError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(value, name, choices):
    """Return ``value`` when it is one of ``choices`` (strings), else raise."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise InvalidParameterError(f"{name} must be one of {options}, got {value!r}")
    return value


def as_array(x, name):
    """``numpy.asarray(x)``, with the errors numpy raises for ragged or unusable
    input turned into ours (ShapeError, DTypeError)."""
    try:
        return np.asarray(x)
    except ValueError as error:
        raise ShapeError(f"{name} is not a rectangular array ({error})") from None
    except TypeError as error:
        raise DTypeError(f"{name} cannot be converted to an array ({error})") from None


def check_real_dtype(array, name):
    """Raise DTypeError unless ``array`` has a real floating, integer or bool dtype."""
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise DTypeError(
            f"{name} has dtype {array.dtype}; expected a real floating or integer dtype"
        )


def as_rows(x, dim, name, *, dtype=None, check_finite=True):
    """Validate a vector or a block of vectors and return it as a C-contiguous
    ``(n, dim)`` float array.

    Parameters
    ----------
    x : array_like, shape (dim,) or (n, dim)
    dim : int
    name : str
        Used in error messages.
    dtype : numpy dtype, optional
        Force this float dtype instead of following the input's.
    check_finite : bool, default=True
        Refuse NaN and infinity. Callers that compute every row's norm may
        pass False and check the norms instead (a non-finite entry makes the
        norm non-finite), saving a pass over the data.

    Returns
    -------
    rows : ndarray, shape (n, dim), float32 or float64, C-contiguous
    was_1d : bool

    Raises
    ------
    DTypeError, ShapeError, NonFiniteError
    """
    array = as_array(x, name)
    check_real_dtype(array, name)
    if array.ndim not in (1, 2):
        raise ShapeError(
            f"{name} has shape {array.shape}; expected ({dim},) or (n, {dim})"
        )
    if array.shape[-1] != dim:
        expected = f"({dim},)" if array.ndim == 1 else f"(n, {dim})"
        raise ShapeError(f"{name} has shape {array.shape}; expected {expected}")
    # float32 stays float32; every other real dtype (float16, integers, bool) becomes float64.
    if dtype is not None:
        target = np.dtype(dtype)
    else:
        target = array.dtype if array.dtype in FLOAT_DTYPES else np.dtype(np.float64)
    was_1d = array.ndim == 1
    rows = np.ascontiguousarray(array.reshape(1, dim) if was_1d else array, dtype=target)
    if check_finite:
        check_all_finite(rows, name)
    return rows, was_1d


def check_all_finite(rows, name):
    """Raise NonFiniteError when ``rows`` holds NaN or infinity."""
    if not np.isfinite(rows).all():
        raise NonFiniteError(f"{name} contains NaN or infinity")
