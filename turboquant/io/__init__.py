"""Saving, loading and memory-mapping turboquant objects.

Every persistent object (quantizers, codes, KV caches, the search index) has
``save(path)`` / ``load(path, *, mmap=False)``, ``to_bytes()`` /
``from_bytes(data)`` and pickles through the same bytes. :func:`load` and
:func:`from_bytes` rebuild an object of any kind. The format is described in
:mod:`turboquant.io._format`: a magic number, a format version, the byte order,
a CRC-checked JSON header with the object's kind and settings, then raw
64-byte-aligned arrays with a CRC32 each. Nothing is unpickled; every length,
offset, dtype, shape and checksum is checked before use, and any failure
raises :class:`turboquant.CorruptPayloadError` naming the field.
"""

from ._format import FORMAT_VERSION
from ._persist import from_bytes, load

__all__ = ["FORMAT_VERSION", "from_bytes", "load"]
