"""Saving, loading and pickling through the checked format of :mod:`turboquant.io._format`.

A persistent class derives from :class:`Persistent` and defines ``_kind`` (the
object kind written in the header), ``_payload()`` returning ``(config, arrays)``
and the classmethod ``_from_payload(config, arrays, mapped)`` rebuilding an
object from a checked header's config and arrays (which it must validate
against the config; arrays are read-only views of the source). Rotations and
codebooks are never stored: they are rebuilt from the config, and the CRC32 of
the rebuilt ones (``_rebuilt()``) is stored and compared on load.
"""

import copy

import numpy as np

from .._errors import CorruptPayloadError, TurboQuantError
from .._version import __version__
from . import _format

_KINDS = {}


def _restore(cls, data):
    """Unpickling hook: the object from its validated bytes."""
    return cls.from_bytes(data)


def codec_tables(codec):
    """The arrays a codec rebuilds from its settings: codebook, block tables,
    rotation (Hadamard signs or the dense matrix) and sign sketch."""
    if codec is None:
        return []
    if hasattr(codec, "mse"):   # Prod: an MSE stage and a sign sketch
        stages = [codec.mse, codec.sketch]
    elif hasattr(codec, "sketch") and not hasattr(codec, "rotation"):   # QJL
        stages = [codec.sketch]
    else:
        stages = [codec]
    tables = []
    for stage in stages:
        book = getattr(stage, "codebook", None)
        if book is not None:
            tables += [book.centroids, book.boundaries]
        for name in ("centroids", "factors"):   # block-scaled codecs
            if isinstance(getattr(stage, name, None), np.ndarray):
                tables.append(getattr(stage, name))
        for transform in (getattr(stage, "rotation", None), getattr(stage, "transform", None)):
            for name in ("signs", "matrix"):
                if isinstance(getattr(transform, name, None), np.ndarray):
                    tables.append(getattr(transform, name))
    return tables


def rebuilt_checks(codecs):
    """``{name: [crc32, ...]}`` of :func:`codec_tables` of each named codec."""
    return {name: [_format.crc32(np.ascontiguousarray(table)) for table in codec_tables(codec)]
            for name, codec in codecs.items()}


def check_restored(payload, arrays, codecs):
    """Raise CorruptPayloadError unless the object rebuilt from ``payload`` holds
    every array the payload has (its own ``arrays``) and rebuilds the same tables
    from its ``codecs`` (see :func:`rebuilt_checks`)."""
    unexpected = set(payload.arrays) - set(arrays)
    if unexpected:
        raise CorruptPayloadError(f"arrays: {sorted(unexpected)} are not arrays of this object")
    if payload.checks != rebuilt_checks(codecs):
        raise CorruptPayloadError("checks: the rebuilt codebooks or rotations differ from the saved ones "
                                  "(a file of another turboquant version, or a corrupted config)")


def expect(arrays, name, dtype, shape):
    """Array ``name`` of ``arrays``, checked to have ``dtype`` and ``shape``
    (None entries of ``shape`` match any length); CorruptPayloadError otherwise."""
    if name not in arrays:
        raise CorruptPayloadError(f"arrays[{name!r}]: missing")
    array = arrays[name]
    if array.dtype != np.dtype(dtype):
        raise CorruptPayloadError(f"arrays[{name!r}].dtype: {array.dtype}, expected {np.dtype(dtype)}")
    if len(array.shape) != len(shape) or any(want is not None and got != want
                                             for got, want in zip(array.shape, shape)):
        raise CorruptPayloadError(f"arrays[{name!r}].shape: {array.shape}, expected {tuple(shape)}")
    return array


def expect_finite(array, name):
    """Raise CorruptPayloadError unless every value of ``array`` is finite."""
    if array.size and not np.isfinite(array).all():
        raise CorruptPayloadError(f"arrays[{name!r}]: holds NaN or infinity")
    return array


def config_field(config, name, types):
    """``config[name]`` checked to be of ``types``."""
    if not isinstance(config, dict) or name not in config:
        raise CorruptPayloadError(f"config.{name}: missing")
    value = config[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                                                 else (types,))):
        raise CorruptPayloadError(f"config.{name}: {value!r} has the wrong type")
    return value


class Persistent:
    """Mixin: ``save``/``load``, ``to_bytes``/``from_bytes`` and pickling, all
    through one versioned, validated format (see :mod:`turboquant.io`)."""

    _kind = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_kind"):
            _KINDS[cls._kind] = cls

    # -- hooks ----------------------------------------------------------------------------------------
    def _payload(self):  # pragma: no cover (every persistent class defines it)
        raise NotImplementedError

    @classmethod
    def _from_payload(cls, config, arrays, mapped):  # pragma: no cover
        raise NotImplementedError

    def _rebuilt(self):
        """``{name: codec}`` whose rebuilt tables are checksummed (none by default)."""
        return {}

    # -- public ---------------------------------------------------------------------------------------
    def to_bytes(self):
        """The object as bytes of the turboquant format (see :mod:`turboquant.io`).

        Returns
        -------
        bytes
        """
        config, arrays = self._payload()
        return _format.encode(self._kind, config, arrays, rebuilt_checks(self._rebuilt()), __version__)

    @classmethod
    def from_bytes(cls, data):
        """Rebuild an object from :meth:`to_bytes` output, validating every byte.

        Parameters
        ----------
        data : bytes-like

        Raises
        ------
        CorruptPayloadError
            If the bytes are truncated, corrupted, of another kind or inconsistent
            with their settings; the message names the field.
        """
        return cls._of_payload(_format.decode(data), mapped=False)

    def save(self, path):
        """Write the object to ``path`` atomically (a temporary file in the same
        folder, fsynced, then renamed over ``path``): a failed save leaves any
        previous file intact.

        Parameters
        ----------
        path : str or os.PathLike
        """
        config, arrays = self._payload()
        _format.write(path, self._kind, config, arrays, rebuilt_checks(self._rebuilt()), __version__)

    @classmethod
    def load(cls, path, *, mmap=False):
        """Read an object saved by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike
        mmap : bool, default=False
            Map the file read-only instead of reading it: the packed codes stay
            in the file and are paged in as they are used, and many processes
            share one copy. Arrays of at least 1 MiB are then mapped without
            reading them for their checksum (``verify()`` on the result's
            ``payload`` is not needed for safety: every length, offset and
            dtype is still checked, so a corrupted mapped array can give wrong
            numbers but never an out-of-bounds read). Appending to a mapped
            object copies its arrays into memory first (copy-on-write); the file
            is never written.

        Raises
        ------
        CorruptPayloadError, OSError
        """
        return cls._of_payload(_format.read(path, mmap=bool(mmap)), mapped=bool(mmap))

    @classmethod
    def _of_payload(cls, payload, mapped):
        if payload.kind != cls._kind:
            raise CorruptPayloadError(f"kind: the file holds a {payload.kind!r}, not a {cls._kind!r}")
        try:
            obj = cls._from_payload(payload.config, payload.arrays, mapped)
        except CorruptPayloadError:
            raise
        except (TurboQuantError, ValueError, TypeError, KeyError, IndexError, OverflowError) as error:
            raise CorruptPayloadError(f"config: {error}") from None
        check_restored(payload, obj._payload()[1], obj._rebuilt())
        return obj

    def __reduce__(self):
        return _restore, (type(self), self.to_bytes())


def attribute_copy(obj):
    """An independent copy made attribute by attribute (``copy.deepcopy`` of the
    instance dict), sharing what declares itself immutable (codecs): the quick
    in-memory copy, where ``copy.deepcopy(obj)`` goes through the checked bytes."""
    clone = object.__new__(type(obj))
    clone.__dict__.update(copy.deepcopy(obj.__dict__))
    return clone


def load(path, *, mmap=False):
    """Read any object saved by turboquant's ``save``, whatever its class.

    Parameters
    ----------
    path : str or os.PathLike
    mmap : bool, default=False
        See :meth:`Persistent.load`.

    Returns
    -------
    The object (a quantizer, codes, a KV cache or an index).

    Raises
    ------
    CorruptPayloadError, OSError
    """
    payload = _format.read(path, mmap=bool(mmap))
    cls = _KINDS.get(payload.kind)
    if cls is None:
        raise CorruptPayloadError(f"kind: {payload.kind!r} is not an object turboquant knows")
    return cls._of_payload(payload, mapped=bool(mmap))


def from_bytes(data):
    """Rebuild any object from ``to_bytes`` output (see :func:`load`)."""
    payload = _format.decode(data)
    cls = _KINDS.get(payload.kind)
    if cls is None:
        raise CorruptPayloadError(f"kind: {payload.kind!r} is not an object turboquant knows")
    return cls._of_payload(payload, mapped=False)
