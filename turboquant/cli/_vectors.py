"""Vector files of the command-line tool: ``.npy`` (memory-mapped) and ``.fvecs``, read in blocks."""

import os

import numpy as np

from .._errors import DTypeError, ShapeError

#: Rows read per block when streaming a file (a file larger than memory works).
BLOCK_ROWS = 1 << 15


class UsageError(ValueError):
    """A command-line argument or input file that cannot be used (exit code 1)."""


def open_vectors(path):
    """A read-only (n, d) view of the vectors in ``path``, memory-mapped (not read).

    ``.npy`` files of a real dtype (2-d, or 1-d for one vector) and ``.fvecs``
    files (each vector an int32 dimension then that many float32) are accepted.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if path.endswith(".fvecs"):
        return _open_fvecs(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UsageError(f"{path}: not a readable .npy file ({error})") from None
    if not isinstance(array, np.ndarray):
        raise UsageError(f"{path}: holds several arrays; expected one (n, d) array")
    if array.dtype.kind not in "fiub" or array.dtype.kind == "b":
        raise DTypeError(f"{path}: dtype {array.dtype} is not a real number type")
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ShapeError(f"{path}: shape {array.shape}; expected (n, d) with d >= 2")
    return array


def _open_fvecs(path):
    size = os.path.getsize(path)
    if size < 4:
        raise UsageError(f"{path}: empty or truncated .fvecs file")
    head = np.fromfile(path, dtype="<i4", count=1)
    dim = int(head[0])
    if dim < 2 or size % (4 * (dim + 1)):
        raise UsageError(f"{path}: not an .fvecs file of {dim}-dimensional vectors ({size} bytes)")
    rows = np.memmap(path, dtype="<i4", mode="r", shape=(size // (4 * (dim + 1)), dim + 1))
    if (rows[:, 0] != dim).any():
        raise UsageError(f"{path}: vectors of different dimensions")
    return rows[:, 1:].view("<f4")


def blocks(array, rows=BLOCK_ROWS):
    """``(start, block)`` over the rows of ``array``, each a C-contiguous copy
    (float32 for float32 input, float64 otherwise)."""
    dtype = np.float32 if array.dtype == np.float32 else np.float64
    for start in range(0, array.shape[0], rows):
        yield start, np.ascontiguousarray(array[start:start + rows], dtype=dtype)
