"""One side (keys or values) of every head of a layer, for kernels that run all heads in one call.

The heads' codecs differ only in their seeds: bits, codebooks and block tables
are shared, and each head's rotation is handed to the kernels by address
(``_core.rotate_heads``, ``_core.quantize_heads``,
``_core.small_code_attention_heads``). Every head's rows get the bits its own
codec would give them (the kernels replay the single-head ones).
"""

import math

import numpy as np

from .._errors import NonFiniteError
from .._kernels import _core
from .._validation import FLOAT32_MAX
from ..quant._codec import F32, BlockMSECodec, MSECodec

U8 = np.dtype(np.uint8)


def addresses(arrays):
    """The (C-contiguous) arrays' data addresses as a uintp array."""
    return np.array([a.ctypes.data for a in arrays], dtype=np.uintp)


class HeadCodecs:
    """The MSE codecs (plain or block-scaled) of every head of a layer, with
    their rotations' kernel operands.

    Parameters
    ----------
    codecs : sequence of MSECodec or BlockMSECodec
        One per head, alike but for their seeds.
    prefix : str
        Prefix of the array names the cache stores the codes under.

    Use :meth:`of` (None for codecs the multi-head kernels do not serve).
    """

    def __init__(self, codecs, prefix):
        first = codecs[0]
        self.prefix = prefix
        self.heads = len(codecs)
        self.dim = first.dim
        self.bits = first.bits
        self.block_scaled = isinstance(first, BlockMSECodec)
        self.row_bytes = first.row_bytes
        self.first = first
        if self.block_scaled:
            self.boundaries, self.centroids, self.factors = first.boundaries, first.centroids, first.factors
            self.block_bytes = first.block_bytes
        else:
            self.boundaries, self.centroids = first.codebook.boundaries, first.codebook.centroids
            self.factors, self.block_bytes = None, 0
        rotation = first.rotation
        if hasattr(rotation, "signs"):
            # Hadamard: every head's float64 signs, forwards and backwards alike.
            self.rounds, self.block = rotation.signs.shape[0], rotation.block
            self._operands = [codec.rotation.signs for codec in codecs]
            self.forward = self.backward = addresses(self._operands)
        else:
            # Dense: the float32 small-product operands, x @ Pi.T and y @ Pi.
            self.rounds, self.block = 0, 0
            self._operands = ([codec.rotation.small_operand(1, F32, False) for codec in codecs]
                              + [codec.rotation.small_operand(1, F32, True) for codec in codecs])
            self.forward = addresses(self._operands[:self.heads])
            self.backward = addresses(self._operands[self.heads:])

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self  # immutable: codecs and their rotations' operands

    @classmethod
    def of(cls, codecs, prefix):
        """:class:`HeadCodecs` of ``codecs``, or None when a multi-head kernel does
        not serve them (another kind of codec, or a dense rotation too large for
        the small products)."""
        first = codecs[0]
        if not isinstance(first, (MSECodec, BlockMSECodec)):
            return None
        if any(type(codec) is not type(first) or codec.spec.rotation != first.spec.rotation
               or codec.bits != first.bits or codec.dim != first.dim for codec in codecs):
            return None
        if first.small_rotation(1) is None and not hasattr(first.rotation, "signs"):
            return None
        return cls(codecs, prefix)

    def rotates_in_kernel(self, rows):
        """Whether the attention kernel rotates ``rows`` queries per head itself
        (dense rotations of a few rows), as the single-head path does."""
        return self.block == 0 and self.first.small_rotation(rows) is not None

    def rotate(self, rows, n_threads, inverse=False):
        """(heads, m, dim) float32 ``rows`` of every head rotated by its own rotation
        (:meth:`MSECodec.rotate`; :meth:`MSECodec.unrotate` when ``inverse``)."""
        out = np.empty_like(rows)
        _core.rotate_heads(rows, self.backward if inverse else self.forward, self.rounds, self.block,
                           bool(inverse), out, n_threads)
        return out

    def encode(self, rows, n_threads, name):
        """Codes of row ``h`` of the (heads, dim) float32 C-contiguous ``rows`` with
        head ``h``'s codec, ``{prefix + array name: (heads, ...) array}`` as the
        codec's ``quantize`` names them (the same bits).

        Raises
        ------
        NonFiniteError
            When a row's norm (or, block-scaled, its rms as float16) cannot be stored.
        """
        x = rows.reshape(self.heads, 1, self.dim)
        p = self.prefix
        if not self.block_scaled:
            norms = np.empty((self.heads, 1))
            codes = np.empty((self.heads, 1, self.row_bytes), dtype=U8)
            _core.quantize_heads(x, self.forward, self.rounds, self.block, self.boundaries, self.centroids,
                                 self.bits, norms, codes, n_threads)
            norms = norms[:, 0]
            _check_norms(norms, name)
            return {p + "indices": codes[:, 0], p + "norms": norms.astype(np.float32)}
        rotated = np.empty_like(x)
        _core.rotate_heads(x, self.forward, self.rounds, self.block, False, rotated, n_threads)
        rotated = rotated.reshape(self.heads, self.dim)
        norms = np.empty(self.heads)
        _core.row_norms(rotated, norms, n_threads)
        _check_norms(norms, name)
        with np.errstate(over="ignore"):
            scales = (norms / math.sqrt(self.dim)).astype(np.float16)
        if not np.isfinite(scales).all():
            raise NonFiniteError(f"{name} has a row whose rms exceeds float16's range (65504); "
                                 "block-scaled codes store it as float16")
        indices = np.empty((self.heads, self.row_bytes), dtype=U8)
        block_scales = np.empty((self.heads, self.block_bytes), dtype=U8)
        _core.block_quantize_pack(rotated, scales.astype(np.float64), self.boundaries, self.centroids,
                                  self.factors, self.bits, indices, block_scales, n_threads)
        return {p + "indices": indices, p + "block_scales": block_scales, p + "norms": scales}

    def fused_operands(self, buffers):
        """Keyword-free operands of ``small_code_attention_heads`` for this side over
        the live rows of every head's buffer: ``(codes, norms, block_scales, keep)``
        address arrays (``block_scales`` None for plain codes) and the arrays the
        addresses point into that the caller keeps alive during the call."""
        p = self.prefix
        codes = np.array([buffer.address(p + "indices") for buffer in buffers], dtype=np.uintp)
        if not self.block_scaled:
            norms = np.array([buffer.address(p + "norms") for buffer in buffers], dtype=np.uintp)
            return codes, norms, None, None
        # float16 scales, widened for the kernel: every head's after the other's in one array.
        scales = [buffer.live(p + "norms") for buffer in buffers]
        widened = np.concatenate(scales, dtype=F32)
        starts = np.cumsum([0] + [len(part) for part in scales[:-1]])
        norms = (widened.ctypes.data + widened.itemsize * starts).astype(np.uintp)
        blocks = np.array([buffer.address(p + "block_scales") for buffer in buffers], dtype=np.uintp)
        return codes, norms, blocks, widened


def _check_norms(norms, name):
    if norms.size and not norms.max() <= FLOAT32_MAX:
        raise NonFiniteError(f"a vector of {name} has a norm beyond the float32 range and cannot be stored")
