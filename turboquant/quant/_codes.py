"""Containers for quantized vectors.

A codes object is an immutable batch of ``n`` quantized vectors: a few
row-aligned numpy arrays (bit-packed indices, packed signs, float32 norms) and
the :class:`CodeSpec` of the quantizer that made them. Its arrays are
read-only; slicing gives views, every other operation gives new arrays.
"""

import dataclasses
import operator

import numpy as np

from .._errors import CorruptPayloadError, IncompatibleCodesError, IndexOutOfRangeError, InvalidParameterError
from .._validation import check_bool, check_choice, check_int, readonly
from ..io._persist import Persistent, config_field
from ._rotation import ROTATIONS, SKETCHES

#: ``kind: (lowest bits, highest bits, rotations, sketches)`` of valid specs.
SPEC_RULES = {"mse": (1, 8, ROTATIONS, ("",)),
              "prod": (2, 8, ROTATIONS, SKETCHES),
              "qjl": (1, 1, ("",), SKETCHES)}


#: Coordinates per block of block-scaled MSE codes, and bits of each block's factor index.
BLOCK_SCALE_SIZE = 16
BLOCK_SCALE_BITS = 4


def block_count(dim):
    """Blocks of ``BLOCK_SCALE_SIZE`` coordinates in a row of ``dim`` (the last may be short)."""
    return (dim + BLOCK_SCALE_SIZE - 1) // BLOCK_SCALE_SIZE


def packed_row_bytes(dim, bits):
    """Bytes of one row of ``dim`` indices of ``bits`` bits: ``ceil(dim * bits / 8)``."""
    return (dim * bits + 7) // 8


@dataclasses.dataclass(frozen=True)
class CodeSpec:
    """Identity of the quantizer behind a batch of codes.

    Two batches can be concatenated, and a quantizer can read a batch, only
    when their specs are equal.

    Attributes
    ----------
    kind : {"mse", "prod", "qjl"}
    dim : int
    bits : int
        Bits per coordinate in total (for "prod" this includes the sign bit; 1 for "qjl").
    seed : int
    rotation : str
        "dense" or "hadamard"; "" for "qjl", which has no rotation.
    sketch : str
        "gaussian" or "hadamard"; "" for "mse", which has no sketch.
    block_scales : bool
        Block-scaled MSE codes (``TurboQuantMSE(..., block_scales=True)``): a
        float16 scale per vector and a 4-bit factor per block of
        ``BLOCK_SCALE_SIZE`` coordinates instead of a float32 norm. False for
        every other kind.
    """

    kind: str
    dim: int
    bits: int
    seed: int
    rotation: str = ""
    sketch: str = ""
    block_scales: bool = False

    def __post_init__(self):
        kind = check_choice(self.kind, "kind", tuple(SPEC_RULES))
        low, high, rotations, sketches = SPEC_RULES[kind]
        object.__setattr__(self, "dim", check_int(self.dim, "dim", low=2))
        object.__setattr__(self, "bits", check_int(self.bits, f"bits ({kind} codes)", low=low, high=high))
        object.__setattr__(self, "seed", check_int(self.seed, "seed", low=0))
        check_choice(self.rotation, f"rotation ({kind} codes)", rotations)
        check_choice(self.sketch, f"sketch ({kind} codes)", sketches)
        object.__setattr__(self, "block_scales", check_bool(self.block_scales, "block_scales"))
        if self.block_scales and kind != "mse":
            raise InvalidParameterError(f"block_scales is an option of mse codes, not {kind}")

    def to_dict(self):
        """The spec as a JSON-ready dict (``block_scales`` only when set)."""
        data = dataclasses.asdict(self)
        if not self.block_scales:
            del data["block_scales"]
        return data

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        InvalidParameterError
            If ``data`` is not a dict of the spec's fields, or a field is invalid.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not set(data) <= names or not {"kind", "dim", "bits", "seed"} <= set(data):
            raise InvalidParameterError(f"a CodeSpec dict needs the fields {sorted(names)}, got {data!r}")
        return cls(**data)

    def row_layout(self):
        """``{array name: (dtype, bytes or items per row)}`` of codes with this spec."""
        sign_bytes = packed_row_bytes(self.dim, 1)
        if self.kind == "mse" and self.block_scales:
            return {"indices": (np.uint8, packed_row_bytes(self.dim, self.bits)),
                    "block_scales": (np.uint8, packed_row_bytes(block_count(self.dim), BLOCK_SCALE_BITS)),
                    "norms": (np.float16, None)}
        if self.kind == "mse":
            return {"indices": (np.uint8, packed_row_bytes(self.dim, self.bits)),
                    "norms": (np.float32, None)}
        if self.kind == "prod":
            return {"indices": (np.uint8, packed_row_bytes(self.dim, self.bits - 1)),
                    "signs": (np.uint8, sign_bytes),
                    "norms": (np.float32, None),
                    "residual_norms": (np.float32, None)}
        if self.kind == "qjl":
            return {"signs": (np.uint8, sign_bytes), "norms": (np.float32, None)}
        raise InvalidParameterError(f"unknown codes kind {self.kind!r}")  # pragma: no cover (checked at construction)


class Codes(Persistent):
    """A batch of quantized vectors (base class of the concrete codes types).

    Do not build one by hand: quantizers return them from ``quantize``, and
    :meth:`from_arrays` rebuilds one from plain arrays after checking them.
    ``save``/``load`` (``mmap=True`` maps the packed arrays read-only),
    ``to_bytes``/``from_bytes`` and pickling go through the checked format of
    :mod:`turboquant.io`.

    Attributes
    ----------
    spec : CodeSpec
        The quantizer that made the codes.
    """

    kind = None

    def __init__(self, spec, arrays):
        # Trusted constructor: ``arrays`` already has the layout of ``spec``.
        self.spec = spec
        self._arrays = {name: readonly(arrays[name]) for name in spec.row_layout()}

    # -- construction from untrusted arrays ---------------------------------
    @classmethod
    def from_arrays(cls, spec, **arrays):
        """Rebuild codes from plain arrays, validating their layout first.

        Parameters
        ----------
        spec : CodeSpec or dict
        **arrays : ndarray
            Exactly the arrays named by ``spec.row_layout()``, with the dtypes
            and row widths it gives and the same number of rows.

        Returns
        -------
        Codes
            A new object owning copies of the arrays.

        Raises
        ------
        CorruptPayloadError
            If an array is missing, extra, of the wrong dtype or shape, the row
            counts differ, or a norm is negative or not finite.
        """
        return cls._checked(spec, arrays, copy=True)

    @classmethod
    def _checked(cls, spec, arrays, copy):
        """:meth:`from_arrays`, keeping the (read-only) arrays themselves when not ``copy``."""
        if isinstance(spec, dict):
            spec = CodeSpec.from_dict(spec)
        if not isinstance(spec, CodeSpec):
            raise CorruptPayloadError(f"spec must be a CodeSpec or its dict, got {type(spec).__name__}")
        if spec.kind != cls.kind:
            raise CorruptPayloadError(f"spec is of kind {spec.kind!r}; {cls.__name__} needs {cls.kind!r}")
        layout = spec.row_layout()
        if set(arrays) != set(layout):
            raise CorruptPayloadError(
                f"{cls.__name__} needs arrays {sorted(layout)}, got {sorted(arrays)}")
        checked = {}
        n_rows = None
        for name, (dtype, width) in layout.items():
            try:
                array = np.asarray(arrays[name])
            except (TypeError, ValueError):
                raise CorruptPayloadError(f"{name} is not an array") from None
            if array.dtype != np.dtype(dtype):
                raise CorruptPayloadError(f"{name} has dtype {array.dtype}; expected {np.dtype(dtype)}")
            expected_ndim = 1 if width is None else 2
            if array.ndim != expected_ndim or (width is not None and array.shape[1] != width):
                want = "(n,)" if width is None else f"(n, {width})"
                raise CorruptPayloadError(f"{name} has shape {array.shape}; expected {want}")
            if n_rows is None:
                n_rows = array.shape[0]
            elif array.shape[0] != n_rows:
                raise CorruptPayloadError(
                    f"{name} has {array.shape[0]} rows; the other arrays have {n_rows}")
            if width is None and not (np.isfinite(array).all() and (array >= 0).all()):
                raise CorruptPayloadError(f"{name} must be finite and non-negative")
            checked[name] = np.array(array, order="C", copy=True) if copy else np.ascontiguousarray(array)
        return cls(spec, checked)

    # -- persistence -----------------------------------------------------------
    def _payload(self):
        return {"spec": self.spec.to_dict()}, dict(self._arrays)

    @classmethod
    def _from_payload(cls, config, arrays, mapped):
        if set(config) != {"spec"}:
            raise CorruptPayloadError("config: a codes file holds its spec only")
        return cls._checked(config_field(config, "spec", dict), arrays, copy=not mapped)

    def to_arrays(self):
        """Copies of the row arrays, as a dict ``{name: ndarray}`` (see :meth:`from_arrays`)."""
        return {name: array.copy() for name, array in self._arrays.items()}

    # -- sequence protocol ---------------------------------------------------
    def __len__(self):
        return next(iter(self._arrays.values())).shape[0]

    def __getitem__(self, key):
        """Rows ``key`` (int, slice, integer or boolean array) as codes of the same spec.

        An integer gives a batch of one row; a slice gives read-only views.
        """
        n = len(self)
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            index = operator.index(key)
            if not -n <= index < n:
                raise IndexOutOfRangeError(f"index {index} is out of range for {n} codes")
            index %= n
            key = slice(index, index + 1)
        elif not isinstance(key, slice):
            try:
                key = np.asarray(key)
            except (TypeError, ValueError):
                key = None
            if key is not None and key.size == 0 and key.dtype != bool:
                key = key.astype(np.intp)
            if key is None or key.ndim != 1 or (key.dtype != bool and key.dtype.kind not in "iu"):
                raise IndexOutOfRangeError(
                    "codes can be indexed by an int, a slice, or a 1-d integer or boolean array")
            if key.dtype == bool and key.shape[0] != n:
                raise IndexOutOfRangeError(f"a boolean index of {key.shape[0]} entries for {n} codes")
            if key.dtype != bool and key.size and not (-n <= key.min() and key.max() < n):
                raise IndexOutOfRangeError(f"an index array with entries out of range for {n} codes")
        return type(self)(self.spec, {name: array[key] for name, array in self._arrays.items()})

    def drop_oldest(self, count):
        """Codes without the first ``count`` rows (the oldest, for sliding-window eviction).

        Raises
        ------
        InvalidParameterError
            If ``count`` is negative or larger than ``len(self)``.
        """
        return self[check_int(count, "count", low=0, high=len(self)):]

    @classmethod
    def concatenate(cls, batches):
        """Join batches of the same spec, in order, into one new batch.

        Raises
        ------
        IncompatibleCodesError
            If the batches are of different kinds or specs.
        InvalidParameterError
            If ``batches`` is empty.
        """
        try:
            batches = list(batches)
        except TypeError:
            raise InvalidParameterError(f"concatenate needs an iterable of codes, got {batches!r}") from None
        if not batches:
            raise InvalidParameterError("concatenate needs at least one batch of codes")
        for batch in batches:
            if not isinstance(batch, cls):
                raise IncompatibleCodesError(
                    f"cannot concatenate {type(batch).__name__} with {cls.__name__}.concatenate")
        first = batches[0]
        for other in batches[1:]:
            if type(other) is not type(first):
                raise IncompatibleCodesError(
                    f"cannot concatenate {type(other).__name__} with {type(first).__name__}")
            first.check_compatible(other.spec, "concatenate")
        return type(first)(first.spec, {
            name: np.concatenate([b._arrays[name] for b in batches]) for name in first._arrays})

    def check_compatible(self, spec, action="use"):
        """Raise :class:`IncompatibleCodesError` unless ``spec`` equals these codes' spec."""
        if spec != self.spec:
            raise IncompatibleCodesError(
                f"cannot {action} codes made by {self.spec} with {spec}")

    # -- accounting -----------------------------------------------------------
    @property
    def nbytes(self):
        """Bytes held by the codes' arrays (every stored byte, padding included)."""
        return sum(array.nbytes for array in self._arrays.values())

    @property
    def dim(self):
        """Dimension of the coded vectors."""
        return self.spec.dim

    @property
    def norms(self):
        """(n,) float32 norms of the original vectors (float16 scales of block-scaled codes; read-only)."""
        return self._arrays["norms"]

    def __eq__(self, other):
        if not isinstance(other, Codes):
            return NotImplemented
        return self.spec == other.spec and all(
            np.array_equal(a, other._arrays[name]) for name, a in self._arrays.items())

    __hash__ = None

    def __repr__(self):
        return (f"{type(self).__name__}(n={len(self)}, dim={self.spec.dim}, "
                f"bits={self.spec.bits}, nbytes={self.nbytes})")


class MSECodes(Codes):
    """Codes of :class:`TurboQuantMSE`: ``indices`` (n, ceil(d*b/8)) uint8 and ``norms`` (n,) float32.

    Block-scaled codes (``spec.block_scales``) hold ``norms`` as (n,) float16
    scales (the rms of the rotated vector) and ``block_scales``, the packed
    4-bit factor index of each block of 16 coordinates.
    """

    kind = "mse"
    _kind = "MSECodes"

    @property
    def indices(self):
        """(n, ceil(dim*bits/8)) uint8 bit-packed centroid indices (read-only)."""
        return self._arrays["indices"]

    @property
    def block_scales(self):
        """(n, ceil(ceil(dim/16)/2)) uint8 packed 4-bit block factor indices, or None (read-only)."""
        return self._arrays.get("block_scales")


class ProdCodes(Codes):
    """Codes of :class:`TurboQuantProd`: MSE-stage ``indices`` with ``bits - 1`` bits,
    packed QJL ``signs`` of the residual, ``norms`` and ``residual_norms``."""

    kind = "prod"
    _kind = "ProdCodes"

    @property
    def indices(self):
        """(n, ceil(dim*(bits-1)/8)) uint8 bit-packed indices of the MSE stage (read-only)."""
        return self._arrays["indices"]

    @property
    def signs(self):
        """(n, ceil(dim/8)) uint8 packed signs of the sketched residual (read-only)."""
        return self._arrays["signs"]

    @property
    def residual_norms(self):
        """(n,) float32 norms of the residual of the unit-normalised vector (read-only)."""
        return self._arrays["residual_norms"]


class QJLCodes(Codes):
    """Codes of :class:`QJL`: packed ``signs`` (n, ceil(d/8)) uint8 and ``norms`` (n,) float32."""

    kind = "qjl"
    _kind = "QJLCodes"

    @property
    def signs(self):
        """(n, ceil(dim/8)) uint8 packed signs of the sketch (read-only)."""
        return self._arrays["signs"]


CODES_TYPES = {cls.kind: cls for cls in (MSECodes, ProdCodes, QJLCodes)}
