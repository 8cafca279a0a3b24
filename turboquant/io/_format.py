"""The turboquant file format: a validated header and 64-byte-aligned raw arrays.

Layout (every integer little-endian)::

    offset  size  field
    0       8     magic  b"\\x93TQUANT\\n"
    8       2     format version (FORMAT_VERSION)
    10      1     byte order of the arrays: 1 = little-endian (the only one written)
    11      1     reserved, 0
    12      4     header length H (bytes of UTF-8 JSON)
    16      4     CRC32 of the header
    20      H     header: {"kind", "version", "config", "arrays", "checks"}
    ...           zeros up to the next multiple of 64
    ...           each array's raw C-order bytes at the 64-aligned "offset" its
                  entry gives, zeros between; the file ends with the last array

An entry of ``"arrays"`` is ``{"name", "dtype", "shape", "offset", "crc32"}``;
``"config"`` is the object's settings as JSON; ``"checks"`` holds checksums of
what a reader rebuilds from the config (codebooks, rotations), which the reader
compares with its own. Nothing is ever unpickled: a reader takes numbers,
strings, lists and dicts from the JSON and raw bytes of the dtypes in
``DTYPES`` from the rest, and checks every length, offset and checksum before
a byte of an array is used. Any failure raises :class:`CorruptPayloadError`
naming the field.
"""

import json
import mmap as mmap_module
import os
import struct
import tempfile
import zlib

import numpy as np

from .._errors import CorruptPayloadError

MAGIC = b"\x93TQUANT\n"
FORMAT_VERSION = 1
LITTLE_ENDIAN = 1
ALIGNMENT = 64
PREFIX = struct.Struct("<8sHBBII")
MAX_HEADER_BYTES = 1 << 26
MAX_ARRAYS = 1 << 16
# Array dtypes a file may hold, by their numpy little-endian names.
DTYPES = {name: np.dtype(name) for name in ("|u1", "<u2", "<i4", "<i8", "<f2", "<f4", "<f8", "<u8")}
HEADER_KEYS = {"kind", "version", "config", "arrays", "checks"}
ENTRY_KEYS = {"name", "dtype", "shape", "offset", "crc32"}
# With mmap=True, arrays at least this large are mapped without reading them
# for their checksum (verify() reads them); smaller ones are checked at once.
LAZY_CRC_BYTES = 1 << 20


def _aligned(offset):
    return -(-offset // ALIGNMENT) * ALIGNMENT


def crc32(data):
    """CRC32 of the bytes of a buffer (an array is read in C order)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return zlib.crc32(memoryview(data)) & 0xFFFFFFFF


def _plan(kind, config, arrays, checks, library_version):
    """The header bytes and the (offset, C-contiguous little-endian array) list."""
    entries, parts = [], []
    for name, array in arrays.items():
        array = np.asarray(array)
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder not in "|<=" else array.dtype
        array = np.ascontiguousarray(array, dtype=little)
        if array.dtype.str not in DTYPES:
            raise TypeError(f"array {name!r} has dtype {array.dtype}, which the format does not hold")
        entries.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "offset": 0,
                        "crc32": crc32(array)})
        parts.append(array)
    header = {"kind": kind, "version": library_version, "config": config, "arrays": entries, "checks": checks}
    # Offsets depend on the header's length, which depends on the offsets' digits:
    # lay out until the length is stable.
    length = -1
    while True:
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) == length:
            break
        length = len(text)
        offset = _aligned(PREFIX.size + length)
        for entry, array in zip(entries, parts):
            entry["offset"] = offset
            offset = _aligned(offset + array.nbytes)
    return text, [(entry["offset"], array) for entry, array in zip(entries, parts)]


def _chunks(kind, config, arrays, checks, library_version):
    """The file's bytes as a sequence of buffers (prefix, header, padding, arrays)."""
    text, placed = _plan(kind, config, arrays, checks, library_version)
    yield PREFIX.pack(MAGIC, FORMAT_VERSION, LITTLE_ENDIAN, 0, len(text), zlib.crc32(text) & 0xFFFFFFFF)
    yield text
    position = PREFIX.size + len(text)
    for offset, array in placed:
        yield b"\0" * (offset - position)
        yield memoryview(array.view(np.uint8).reshape(-1)) if array.size else b""
        position = offset + array.nbytes


def encode(kind, config, arrays, checks, library_version):
    """The bytes of one object: ``kind`` (str), JSON-ready ``config`` and
    ``checks``, ``arrays`` a dict of numpy arrays of the dtypes in DTYPES."""
    return b"".join(bytes(chunk) for chunk in _chunks(kind, config, arrays, checks, library_version))


def write(path, kind, config, arrays, checks, library_version, *, _writer=None):
    """Write one object to ``path`` atomically: into a temporary file of the same
    folder, flushed and fsynced, then renamed over ``path``. On any error the
    temporary file is removed and ``path`` is as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tq-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            write_chunk = _writer(file) if _writer is not None else file.write
            for chunk in _chunks(kind, config, arrays, checks, library_version):
                write_chunk(chunk)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:   # make the rename itself durable where the platform allows it
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def _fail(field, message):
    raise CorruptPayloadError(f"{field}: {message}")


def _check_int(value, field, low=0, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        _fail(field, f"expected an integer >= {low}" + (f" and <= {high}" if high is not None else "")
              + f", got {value!r}")
    return value


class Payload:
    """A decoded, checked file: ``kind``, ``version``, ``config``, ``checks`` and the arrays.

    ``arrays`` maps names to read-only numpy arrays over the source buffer (the
    file's bytes or its memory map). ``unverified`` names the arrays whose
    checksum was not read yet (memory-mapped large arrays); :meth:`verify`
    reads them.
    """

    def __init__(self, kind, version, config, checks, arrays, crcs, unverified):
        self.kind, self.version, self.config, self.checks = kind, version, config, checks
        self.arrays, self._crcs, self.unverified = arrays, crcs, set(unverified)

    def verify(self, names=None):
        """Check the checksums not yet read (or those of ``names``)."""
        for name in sorted(self.unverified if names is None else names):
            if crc32(self.arrays[name]) != self._crcs[name]:
                _fail(f"arrays[{name!r}].crc32", "checksum mismatch")
            self.unverified.discard(name)


def decode(buffer, *, mapped=False):
    """Check and decode the bytes of a file (bytes, bytearray, memoryview or a
    memory map); raises CorruptPayloadError naming the first bad field."""
    view = memoryview(buffer)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    size = len(view)
    if size < PREFIX.size:
        _fail("prefix", f"{size} bytes is shorter than the {PREFIX.size}-byte prefix")
    magic, version, order, reserved, header_length, header_crc = PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        _fail("magic", "not a turboquant file")
    if version != FORMAT_VERSION:
        _fail("format version", f"{version} is not a version this reader knows ({FORMAT_VERSION})")
    if order != LITTLE_ENDIAN:
        _fail("byte order", f"code {order} is not little-endian (1)")
    if reserved != 0:
        _fail("reserved byte", f"must be 0, got {reserved}")
    if header_length > min(MAX_HEADER_BYTES, size - PREFIX.size):
        _fail("header length", f"{header_length} bytes does not fit the {size}-byte file")
    text = bytes(view[PREFIX.size:PREFIX.size + header_length])
    if zlib.crc32(text) & 0xFFFFFFFF != header_crc:
        _fail("header crc32", "checksum mismatch")
    try:
        header = json.loads(text.decode("utf-8"), parse_constant=lambda name: _fail("header", f"{name} in JSON"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        if isinstance(error, CorruptPayloadError):
            raise
        _fail("header", f"not valid JSON ({error})")
    if not isinstance(header, dict) or set(header) != HEADER_KEYS:
        _fail("header", f"expected the keys {sorted(HEADER_KEYS)}")
    kind, config, entries, checks = header["kind"], header["config"], header["arrays"], header["checks"]
    if not isinstance(kind, str):
        _fail("kind", f"expected a string, got {kind!r}")
    if not isinstance(header["version"], str):
        _fail("version", "expected a string")
    if not isinstance(config, dict):
        _fail("config", "expected a JSON object")
    if not isinstance(checks, dict):
        _fail("checks", "expected a JSON object")
    if not isinstance(entries, list) or len(entries) > MAX_ARRAYS:
        _fail("arrays", "expected a list of array entries")
    arrays, crcs, unverified = {}, {}, []
    position = PREFIX.size + header_length
    for number, entry in enumerate(entries):
        field = f"arrays[{number}]"
        if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
            _fail(field, f"expected the keys {sorted(ENTRY_KEYS)}")
        name = entry["name"]
        if not isinstance(name, str) or name in arrays:
            _fail(f"{field}.name", f"expected a new string, got {name!r}")
        field = f"arrays[{name!r}]"
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            _fail(f"{field}.dtype", f"{entry['dtype']!r} is not one of {sorted(DTYPES)}")
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > 8:
            _fail(f"{field}.shape", "expected a list of at most 8 sizes")
        count = 1
        for axis, length in enumerate(shape):
            count *= _check_int(length, f"{field}.shape[{axis}]", high=size)
        nbytes = count * dtype.itemsize
        offset = _check_int(entry["offset"], f"{field}.offset")
        if offset % ALIGNMENT or offset < position or offset > size or nbytes > size - offset:
            _fail(f"{field}.offset", f"{offset} (+{nbytes} bytes) is not a 64-aligned place inside the file "
                                     f"after byte {position}")
        if any(view[position:offset]):
            _fail(f"{field}.offset", "the padding before the array is not zero")
        crc = _check_int(entry["crc32"], f"{field}.crc32", high=0xFFFFFFFF)
        data = view[offset:offset + nbytes]
        if mapped and nbytes >= LAZY_CRC_BYTES:
            unverified.append(name)
        elif crc32(data) != crc:
            _fail(f"{field}.crc32", "checksum mismatch")
        array = np.frombuffer(data, dtype=dtype, count=count).reshape(shape) if count else \
            np.empty(shape, dtype=dtype)
        array.setflags(write=False)
        arrays[name], crcs[name] = array, crc
        position = offset + nbytes
    if position != size:
        _fail("file length", f"{size} bytes; the arrays end at byte {position}")
    return Payload(kind, header["version"], config, checks, arrays, crcs, unverified)


def read(path, *, mmap=False):
    """Decode the file at ``path``: read whole, or memory-mapped read-only
    (arrays are then views of the map, which lives as long as they do)."""
    with open(os.fspath(path), "rb") as file:
        if not mmap:
            return decode(file.read())
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            _fail("prefix", "the file is empty")
        mapped = mmap_module.mmap(file.fileno(), 0, access=mmap_module.ACCESS_READ)
    return decode(mapped, mapped=True)
