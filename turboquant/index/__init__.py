"""Nearest-neighbour search over TurboQuant codes: :class:`TurboQuantIndex`."""

from ._index import TurboQuantIndex

__all__ = ["TurboQuantIndex"]
