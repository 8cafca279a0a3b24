"""Persistence: round trips of every object, memory maps, atomic saves, and
corrupted bytes (which must load as an equal object or raise CorruptPayloadError)."""

import copy
import json
import os
import pickle
import struct
import threading
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import turboquant as tq
from turboquant import CorruptPayloadError
from turboquant.io import _format

FUZZ_EXAMPLES = int(os.environ.get("TURBOQUANT_FUZZ_EXAMPLES", "60"))
RNG = np.random.default_rng(2024)


def filled_cache(config, tokens=40, seed=0):
    rng = np.random.default_rng(seed)
    cache = tq.QuantizedKVCache(config)
    keys = rng.standard_normal((tokens, config.dim)) * np.linspace(0.5, 4, config.dim)
    cache.append(keys.astype(np.float32), rng.standard_normal((tokens, config.dim)).astype(np.float32))
    for _ in range(3):
        cache.push_token(rng.standard_normal(config.dim), rng.standard_normal(config.dim))
    return cache


CACHE_CONFIGS = {
    "plain": tq.KVCacheConfig(32),
    "regions": tq.KVCacheConfig(32, sink_tokens=4, residual_tokens=8, outlier_channels=4, center_keys=True),
    "evicting": tq.KVCacheConfig(32, key_bits=3, value_bits=2, max_tokens=24, sink_tokens=2),
    "prod": tq.KVCacheConfig(32, key_strategy="prod", key_bits=3, rotation="hadamard"),
    "block": tq.KVCacheConfig(40, block_scales=True, residual_tokens=4, residual_dtype="float16"),
    "explicit outliers": tq.KVCacheConfig(32, outlier_channels=(1, 7, 30)),
    **{f"preset {name}": tq.KVCacheConfig.preset(name, 64) for name in ("lossless", "balanced", "compact")},
}


def make_objects():
    """One object of every persistent kind (several configurations each), by name."""
    x = RNG.standard_normal((30, 48))
    objects = {
        "mse dense": tq.TurboQuantMSE(48, 3, seed=3),
        "mse hadamard": tq.TurboQuantMSE(48, 4, rotation="hadamard"),
        "mse block": tq.TurboQuantMSE(48, 2, block_scales=True),
        "prod": tq.TurboQuantProd(48, 3, sketch="hadamard"),
        "qjl": tq.QJL(48, seed=9),
    }
    for name in list(objects):
        quantizer = objects[name]
        objects[f"codes {name} float64"] = quantizer.quantize(x)
        objects[f"codes {name} float32"] = quantizer.quantize(x.astype(np.float32))
    for name, config in CACHE_CONFIGS.items():
        objects[f"cache {name}"] = filled_cache(config)
    layer = tq.MultiHeadKVCache(tq.MultiHeadConfig(2, CACHE_CONFIGS["regions"], num_query_heads=4))
    layer.append_all(RNG.standard_normal((2, 20, 32)), RNG.standard_normal((2, 20, 32)))
    objects["multi-head"] = layer
    batch = tq.BatchedMultiHeadKVCache(tq.MultiHeadConfig(2, tq.KVCacheConfig(16, residual_tokens=2)), 2)
    batch.rows[0].append_all(RNG.standard_normal((2, 5, 16)), RNG.standard_normal((2, 5, 16)))
    batch.rows[1].append_all(RNG.standard_normal((2, 9, 16)), RNG.standard_normal((2, 9, 16)))
    objects["batched"] = batch
    base = RNG.standard_normal((300, 24)).astype(np.float32)
    for bits, metric in ((4, "ip"), (2, "l2"), (3, "cosine"), (1, "ip")):
        index = tq.TurboQuantIndex(24, bits, metric=metric, keep_originals=bits == 4)
        index.add(base)
        index.remove(np.arange(0, 300, 7))
        objects[f"index {bits} {metric}"] = index
    objects["index empty"] = tq.TurboQuantIndex(24)
    return objects


OBJECTS = make_objects()
QUERIES = RNG.standard_normal((3, 64)).astype(np.float32)


def outputs(obj):
    """What the object computes (bit-for-bit comparable)."""
    if isinstance(obj, tq.TurboQuantIndex):
        return obj.search(QUERIES[:, :obj.dim], 5)
    if isinstance(obj, tq.QuantizedKVCache):
        return obj.attention_output(QUERIES[:, :obj.dim]), obj.reconstruct_keys()
    if isinstance(obj, tq.MultiHeadKVCache):
        return (obj.attention_output_all(np.tile(QUERIES[:, None, :obj.head_dim], (obj.num_query_heads // 3 + 1,
                                                                                   1, 1))[:obj.num_query_heads]),)
    if isinstance(obj, tq.BatchedMultiHeadKVCache):
        return tuple(outputs(row) for row in obj.rows)
    if isinstance(obj, tq.Codes):
        return tuple(obj.to_arrays().values())
    return (obj.quantize(QUERIES[:, :obj.dim]).to_arrays(),)


def assert_same_outputs(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_outputs(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_outputs(x, y)
    else:
        np.testing.assert_array_equal(a, b)


def grow(obj):
    """Change the object the way users do after loading (append, add)."""
    if isinstance(obj, tq.TurboQuantIndex):
        obj.add(np.ones((3, obj.dim)) * np.arange(1, 4)[:, None])
    elif isinstance(obj, tq.QuantizedKVCache):
        obj.push_token(np.linspace(-1, 1, obj.dim), np.linspace(1, -1, obj.dim))
    elif isinstance(obj, tq.MultiHeadKVCache):
        obj.push_token_all(np.ones((obj.num_heads, obj.head_dim)), np.ones((obj.num_heads, obj.head_dim)))


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_round_trips_are_exact(name, tmp_path):
    original = OBJECTS[name]
    data = original.to_bytes()
    path = tmp_path / "object.tq"
    original.save(path)
    copies = [type(original).from_bytes(data), tq.io.from_bytes(data), type(original).load(path),
              tq.io.load(path), type(original).load(path, mmap=True), pickle.loads(pickle.dumps(original)),
              copy.deepcopy(original)]
    expected = outputs(original)
    for restored in copies:
        assert type(restored) is type(original)
        assert restored.to_bytes() == data
        assert_same_outputs(outputs(restored), expected)
    # Appending to a loaded object, memory-mapped or not, behaves like the original; the file stays as it was.
    before = path.read_bytes()
    reference = copy.deepcopy(original)
    grow(reference)
    for restored in (copies[2], copies[4]):
        grow(restored)
        assert_same_outputs(outputs(restored), outputs(reference))
    assert path.read_bytes() == before


def test_mapped_arrays_are_read_only_views_of_the_file(tmp_path):
    index = tq.TurboQuantIndex(64, 4)
    index.add(RNG.standard_normal((50000, 64)))
    path = tmp_path / "index.tq"
    index.save(path)
    mapped = tq.TurboQuantIndex.load(path, mmap=True)
    assert not mapped._codes.flags.writeable and not mapped._codes.flags.owndata
    assert_same_outputs(mapped.search(QUERIES, 5), index.search(QUERIES, 5))


def test_file_layout(tmp_path):
    codes = tq.TurboQuantMSE(16, 4).quantize(np.eye(16)[:5])
    data = codes.to_bytes()
    magic, version, order, _, length, crc = _format.PREFIX.unpack_from(data)
    assert (magic, version, order) == (b"\x93TQUANT\n", tq.io.FORMAT_VERSION, 1)
    header = json.loads(data[20:20 + length])
    assert zlib.crc32(data[20:20 + length]) == crc
    assert header["kind"] == "MSECodes" and header["version"] == tq.__version__
    for entry in header["arrays"]:
        assert entry["offset"] % 64 == 0
        array = codes.to_arrays()[entry["name"]]
        assert data[entry["offset"]:entry["offset"] + array.nbytes] == array.tobytes()
        assert zlib.crc32(array.tobytes()) == entry["crc32"]


def test_kind_mismatch_and_unknown_kind():
    data = tq.TurboQuantMSE(16, 2).to_bytes()
    with pytest.raises(CorruptPayloadError, match="kind"):
        tq.TurboQuantProd.from_bytes(data)
    with pytest.raises(CorruptPayloadError, match="kind"):
        tq.io.from_bytes(edit_header(data, lambda header: header.update(kind="Pickle")))


def test_a_changed_codebook_is_detected():
    data = tq.TurboQuantMSE(16, 2).to_bytes()
    bad = edit_header(data, lambda header: header["checks"]["codec"].__setitem__(0, 12345))
    with pytest.raises(CorruptPayloadError, match="checks"):
        tq.TurboQuantMSE.from_bytes(bad)


# -- atomic saves ------------------------------------------------------------------------------------

def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "index.tq"
    index = OBJECTS["index 4 ip"]
    index.save(path)
    before = path.read_bytes()
    bigger = copy.deepcopy(index)
    bigger.add(RNG.standard_normal((100, 24)))
    real_chunks = _format._chunks

    def failing_chunks(*args):   # the writer dies after the header and part of the arrays
        for number, chunk in enumerate(real_chunks(*args)):
            if number == 4:
                raise OSError("disk full")
            yield chunk

    monkeypatch.setattr(_format, "_chunks", failing_chunks)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path)
    monkeypatch.setattr(_format, "_chunks", real_chunks)
    monkeypatch.setattr(_format.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("fsync failed")))
    with pytest.raises(OSError, match="fsync failed"):
        bigger.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["index.tq"]   # no temporary file left behind
    assert_same_outputs(outputs(tq.TurboQuantIndex.load(path)), outputs(index))


# -- untrusted bytes ---------------------------------------------------------------------------------

def edit_header(data, edit):
    """``data`` with its JSON header changed by ``edit`` (a valid CRC, offsets as they were)."""
    _, version, order, reserved, length, _ = _format.PREFIX.unpack_from(data)
    header = json.loads(data[20:20 + length])
    edit(header)
    text = json.dumps(header).encode()
    prefix = _format.PREFIX.pack(_format.MAGIC, version, order, reserved, len(text), zlib.crc32(text))
    return prefix + text + data[20 + length:]


FUZZ_TARGETS = {name: OBJECTS[name].to_bytes() for name in
                ("mse hadamard", "codes prod float32", "cache regions", "cache block", "multi-head",
                 "batched", "index 4 ip", "index 2 l2", "index 3 cosine", "qjl")}


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for position, value in enumerate(node):
            yield from _paths(value, prefix + (position,))


fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(name=st.sampled_from(sorted(FUZZ_TARGETS)), cut=st.floats(0, 1))
def test_truncated_files_are_refused(name, cut):
    data = FUZZ_TARGETS[name]
    with pytest.raises(CorruptPayloadError):
        tq.io.from_bytes(data[:int(cut * (len(data) - 1))])


@fuzz
@given(name=st.sampled_from(sorted(FUZZ_TARGETS)), where=st.floats(0, 1), bit=st.integers(0, 7))
def test_bit_flips_are_refused(name, where, bit):
    data = bytearray(FUZZ_TARGETS[name])
    data[int(where * (len(data) - 1))] ^= 1 << bit
    with pytest.raises(CorruptPayloadError):
        tq.io.from_bytes(bytes(data))


@fuzz
@given(name=st.sampled_from(sorted(FUZZ_TARGETS)), pick=st.floats(0, 1), value=JSON_VALUES,
       action=st.sampled_from(["set", "delete", "add"]))
def test_header_edits_load_equal_or_are_refused(name, pick, value, action):
    data = FUZZ_TARGETS[name]

    def edit(header):
        paths = [path for path in _paths(header) if path]
        path = paths[int(pick * (len(paths) - 1))]
        parent = header
        for step in path[:-1]:
            parent = parent[step]
        if action == "set":
            parent[path[-1]] = value
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent["extra"] = value
        else:
            parent.append(value)

    edited = edit_header(data, edit)
    try:
        restored = tq.io.from_bytes(edited)
    except CorruptPayloadError:
        return
    # Accepted: then it is an object whose own bytes load back equal.
    assert tq.io.from_bytes(restored.to_bytes()).to_bytes() == restored.to_bytes()


@pytest.mark.parametrize("name", sorted(FUZZ_TARGETS))
def test_structural_corruptions_name_the_field(name):
    data = FUZZ_TARGETS[name]
    cases = {
        "magic": b"\x00" + data[1:],
        "format version": data[:8] + struct.pack("<H", 99) + data[10:],
        "byte order": data[:10] + b"\x02" + data[11:],
        "header crc32": data[:16] + b"\x00\x00\x00\x00" + data[20:],
        "file length": data + b"\x00" * 64,
    }
    for field, bad in cases.items():
        with pytest.raises(CorruptPayloadError, match=field):
            tq.io.from_bytes(bad)
    if not json.loads(data[20:20 + _format.PREFIX.unpack_from(data)[4]])["arrays"]:
        return   # quantizers hold no arrays

    def first(header):
        return header["arrays"][0]

    edits = {
        "dtype": lambda header: first(header).update(dtype="|O"),
        "offset": lambda header: first(header).update(offset=first(header)["offset"] + 1),
        "shape": lambda header: first(header).update(shape=[10**12]),
    }
    for field, edit in edits.items():
        with pytest.raises(CorruptPayloadError, match=field):
            tq.io.from_bytes(edit_header(data, edit))


def test_semantic_checks_of_arrays():
    index = OBJECTS["index 4 ip"]
    config, arrays = index._payload()
    bad_scale = dict(arrays, scale=np.full_like(arrays["scale"], np.nan))
    data = _format.encode(index._kind, config, bad_scale, tq.io._persist.rebuilt_checks(index._rebuilt()), "x")
    with pytest.raises(CorruptPayloadError, match="scale"):
        tq.TurboQuantIndex.from_bytes(data)
    dup = dict(arrays, ids=np.zeros_like(arrays["ids"]))
    data = _format.encode(index._kind, config, dup, tq.io._persist.rebuilt_checks(index._rebuilt()), "x")
    with pytest.raises(CorruptPayloadError, match="ids"):
        tq.TurboQuantIndex.from_bytes(data)
    cache = OBJECTS["cache regions"]
    config, arrays = cache._payload()
    norms = next(name for name in arrays if name.endswith("main.norms"))
    bad = dict(arrays, **{norms: -arrays[norms]})
    data = _format.encode(cache._kind, config, bad, tq.io._persist.rebuilt_checks(cache._rebuilt()), "x")
    with pytest.raises(CorruptPayloadError, match="norms"):
        tq.QuantizedKVCache.from_bytes(data)


def test_never_unpickles():
    with pytest.raises(CorruptPayloadError):
        tq.io.from_bytes(pickle.dumps({"a": 1}))


# -- concurrency -------------------------------------------------------------------------------------

def test_concurrent_searches_and_a_writer():
    base = RNG.standard_normal((20000, 32)).astype(np.float32)
    index = tq.TurboQuantIndex(32, 4)
    index.add(base[:10000])
    queries = base[:8]
    expected = index.search(queries, 10)
    errors, results = [], []

    def reader():
        try:
            for _ in range(20):
                results.append(index.search(queries, 10, n_threads=2))
        except Exception as error:  # pragma: no cover (reported below)
            errors.append(error)

    def writer():
        try:
            for start in range(10000, 20000, 2000):
                index.add(base[start:start + 2000], n_threads=1)
        except Exception as error:  # pragma: no cover
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(index) == 20000
    # Every search saw the index between two adds: its ids are those of some prefix of the base.
    final = index.search(queries, 10)
    for scores, ids in results:
        assert ids.max() < 20000 and (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_array_equal(index.search(queries, 10)[1], final[1])
    assert expected[1].shape == final[1].shape


def test_concurrent_attention_reads_agree():
    cache = filled_cache(CACHE_CONFIGS["regions"], tokens=3000)
    queries = RNG.standard_normal((4, 32)).astype(np.float32)
    expected = cache.attention_output(queries)
    results = []

    def reader():
        for _ in range(10):
            results.append(cache.attention_output(queries, n_threads=2))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 40
    for result in results:
        np.testing.assert_array_equal(result, expected)


def test_mapped_index_values_are_checked_before_use_or_on_request(tmp_path):
    index = tq.TurboQuantIndex(16, 4)
    index.add(RNG.standard_normal((70000, 16)))
    config, arrays = index._payload()
    arrays = dict(arrays, ids=np.concatenate([arrays["ids"][:-1], arrays["ids"][:1]]))   # a duplicate id
    data = _format.encode(index._kind, config, arrays, tq.io._persist.rebuilt_checks(index._rebuilt()), "x")
    path = tmp_path / "dup.tq"
    path.write_bytes(data)
    with pytest.raises(CorruptPayloadError, match="ids"):
        tq.TurboQuantIndex.load(path)
    mapped = tq.TurboQuantIndex.load(path, mmap=True)   # structure only
    with pytest.raises(CorruptPayloadError, match="ids"):
        mapped.check_mapped()
    with pytest.raises(CorruptPayloadError, match="ids"):
        mapped.add(np.ones((1, 16)))
    assert len(mapped) == 70000
