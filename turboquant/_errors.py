"""Exceptions raised by turboquant.

Every error the package raises on bad input derives from :class:`TurboQuantError`
and from the builtin exception a numpy user would expect (``ValueError`` or
``TypeError``), so ``except ValueError`` keeps working.
"""


class TurboQuantError(Exception):
    """Base class of every error raised by turboquant."""


class InvalidParameterError(TurboQuantError, ValueError):
    """A parameter (dim, bits, seed, n_threads, ...) is outside its valid range."""


class ShapeError(TurboQuantError, ValueError):
    """An array has the wrong number of dimensions or the wrong size."""


class IndexOutOfRangeError(TurboQuantError, IndexError):
    """An index (of a code row or a head) is out of range or of an unusable type."""


class LengthMismatchError(ShapeError):
    """Arrays that must have the same number of rows (or heads) do not."""


class NonFiniteError(TurboQuantError, ValueError):
    """An input holds NaN or infinity, or a norm overflows float32."""


class DTypeError(TurboQuantError, TypeError):
    """An input has a dtype turboquant cannot quantize (not real floating or integer)."""


class IncompatibleCodesError(TurboQuantError, ValueError):
    """Codes were made by a different quantizer (dim, bits, seed or rotation differ)."""


class CorruptPayloadError(TurboQuantError, ValueError):
    """Arrays given to rebuild codes have an inconsistent layout, dtype or size."""
