"""Tests of the KV cache settings: :class:`KVCacheConfig`, :class:`MultiHeadConfig`,
:class:`QuantStrategy` and the stats records (validation, immutability, round trips)."""

import dataclasses
import json

import numpy as np
import pytest

from turboquant import (
    CacheStats,
    InvalidParameterError,
    KVCacheConfig,
    MultiHeadConfig,
    QuantizedKVCache,
    QuantStrategy,
    TurboQuantError,
)


# -- defaults and normalisation ---------------------------------------------------------
def test_defaults():
    config = KVCacheConfig(64)
    assert config.key_strategy is QuantStrategy.MSE
    assert (config.key_bits, config.value_bits, config.seed) == (4, 4, 42)
    assert (config.max_tokens, config.residual_tokens, config.sink_tokens) == (0, 0, 0)
    assert config.outlier_channels == 0 and config.num_outlier_channels == 0
    assert config.outlier_bits == 5  # min(key_bits + 1, 8)
    assert (config.rotation, config.sketch) == ("dense", "gaussian")


@pytest.mark.parametrize("key_bits, expected", [(1, 2), (4, 5), (7, 8), (8, 8)])
def test_default_outlier_bits_is_one_more_than_key_bits(key_bits, expected):
    assert KVCacheConfig(16, key_bits=key_bits).outlier_bits == expected


@pytest.mark.parametrize("value", ["prod", "PROD", "Prod", QuantStrategy.PROD])
def test_string_strategies_are_accepted(value):
    config = KVCacheConfig(16, key_strategy=value)
    assert config.key_strategy is QuantStrategy.PROD
    assert KVCacheConfig(16, key_strategy="mse").key_strategy is QuantStrategy.MSE


def test_numpy_integers_are_accepted_and_stored_as_int():
    config = KVCacheConfig(np.int64(16), key_bits=np.uint8(3), seed=np.int32(7), max_tokens=np.int16(9))
    assert config == KVCacheConfig(16, key_bits=3, seed=7, max_tokens=9)
    assert all(type(getattr(config, name)) is int for name in ("dim", "key_bits", "seed", "max_tokens"))


def test_numpy_integer_outlier_count_is_accepted():
    config = KVCacheConfig(16, outlier_channels=np.int64(4))
    assert config.outlier_channels == 4
    assert type(config.outlier_channels) is int


@pytest.mark.parametrize("channels", [(9, 2, 5), [5, 9, 2], np.array([2, 9, 5]), (np.int64(9), 2, np.uint8(5))])
def test_explicit_outlier_channels_become_a_sorted_tuple(channels):
    config = KVCacheConfig(16, outlier_channels=channels)
    assert config.outlier_channels == (2, 5, 9)
    assert config.num_outlier_channels == 3
    assert all(type(c) is int for c in config.outlier_channels)


def test_max_tokens_zero_allows_any_sink_count():
    assert KVCacheConfig(16, sink_tokens=100, max_tokens=0).sink_tokens == 100
    assert KVCacheConfig(16, sink_tokens=4, max_tokens=5).max_tokens == 5


def test_outlier_channel_extremes():
    assert KVCacheConfig(16, outlier_channels=2).num_outlier_channels == 2
    assert KVCacheConfig(16, outlier_channels=14).num_outlier_channels == 14
    assert KVCacheConfig(16, outlier_channels=(0, 15)).outlier_channels == (0, 15)
    assert KVCacheConfig(16, outlier_channels=()).num_outlier_channels == 0


# -- validation ---------------------------------------------------------------------------
BAD_CONFIGS = [
    # (kwargs, regex the message must match)
    ({"dim": 0}, r"dim must be an integer >= 2, got 0"),
    ({"dim": 1}, r"dim must be an integer >= 2, got 1"),
    ({"dim": -3}, r"dim must be an integer >= 2"),
    ({"dim": 16.0}, r"dim must be an integer, got 16\.0"),
    ({"dim": "16"}, r"dim must be an integer, got '16'"),
    ({"dim": True}, r"dim must be an integer, got True"),
    ({"key_bits": 0}, r"key_bits \(mse keys\) must be an integer in 1\.\.8, got 0"),
    ({"key_bits": 9}, r"key_bits \(mse keys\) must be an integer in 1\.\.8, got 9"),
    ({"key_bits": 1, "key_strategy": "prod"}, r"key_bits \(prod keys\) must be an integer in 2\.\.8, got 1"),
    ({"key_bits": 9, "key_strategy": "prod"}, r"key_bits \(prod keys\) must be an integer in 2\.\.8, got 9"),
    ({"key_bits": 4.0}, r"key_bits \(mse keys\) must be an integer"),
    ({"value_bits": 0}, r"value_bits must be an integer in 1\.\.8, got 0"),
    ({"value_bits": 9}, r"value_bits must be an integer in 1\.\.8, got 9"),
    ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"max_tokens": -1}, r"max_tokens must be an integer >= 0, got -1"),
    ({"residual_tokens": -1}, r"residual_tokens must be an integer >= 0, got -1"),
    ({"sink_tokens": -1}, r"sink_tokens must be an integer >= 0, got -1"),
    ({"max_tokens": 4, "sink_tokens": 4}, r"max_tokens \(4\) must exceed sink_tokens \(4\)"),
    ({"max_tokens": 2, "sink_tokens": 4}, r"max_tokens \(2\) must exceed sink_tokens \(4\)"),
    ({"outlier_channels": 1}, r"outlier_channels must select 2\.\.14 channels \(dim=16\), got 1"),
    ({"outlier_channels": 15}, r"outlier_channels must select 2\.\.14 channels \(dim=16\), got 15"),
    ({"outlier_channels": 16}, r"outlier_channels must select 2\.\.14 channels"),
    ({"outlier_channels": -2}, r"outlier_channels must be an integer >= 0, got -2"),
    ({"outlier_channels": 2.0}, r"outlier_channels must be an integer"),
    ({"outlier_channels": "3"}, r"outlier_channels must be an integer"),
    ({"outlier_channels": True}, r"outlier_channels must be an integer"),
    ({"outlier_channels": (3,)}, r"outlier_channels must select 2\.\.14 channels \(dim=16\), got 1"),
    ({"outlier_channels": tuple(range(15))}, r"outlier_channels must select 2\.\.14 channels"),
    ({"outlier_channels": (1, 1)}, r"outlier_channels has repeated channels: \[1, 1\]"),
    ({"outlier_channels": (2, 5, 2)}, r"outlier_channels has repeated channels"),
    ({"outlier_channels": (0, 16)}, r"outlier channel must be an integer in 0\.\.15, got 16"),
    ({"outlier_channels": (-1, 3)}, r"outlier channel must be an integer in 0\.\.15, got -1"),
    ({"outlier_channels": (1.0, 3)}, r"outlier channel must be an integer"),
    ({"outlier_channels": 2, "outlier_bits": 0}, r"outlier_bits must be an integer in 1\.\.8, got 0"),
    ({"outlier_channels": 2, "outlier_bits": 9}, r"outlier_bits must be an integer in 1\.\.8, got 9"),
    ({"outlier_channels": 2, "outlier_bits": 1, "key_strategy": "prod"},
     r"outlier_bits must be an integer in 2\.\.8, got 1"),
    ({"rotation": "qr"}, r"rotation must be one of 'dense', 'hadamard', got 'qr'"),
    ({"rotation": "Dense"}, r"rotation must be one of"),
    ({"rotation": None}, r"rotation must be one of"),
    ({"sketch": "dense"}, r"sketch must be one of 'gaussian', 'hadamard', got 'dense'"),
    ({"sketch": 1}, r"sketch must be one of"),
    ({"key_strategy": "fast"}, r"key_strategy must be 'mse' or 'prod', got 'fast'"),
    ({"key_strategy": None}, r"key_strategy must be 'mse' or 'prod', got None"),
    ({"key_strategy": 1}, r"key_strategy must be 'mse' or 'prod', got 1"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONFIGS, ids=[repr(k) for k, _ in BAD_CONFIGS])
def test_bad_values_are_refused_with_a_message_naming_them(kwargs, message):
    kwargs = {"dim": 16, **kwargs}
    with pytest.raises(InvalidParameterError, match=message) as info:
        KVCacheConfig(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TurboQuantError)


def test_small_dims_limit_outliers():
    # dim=3 leaves no room for 2 outlier channels plus 2 regular ones.
    with pytest.raises(InvalidParameterError, match=r"outlier_channels must select 2\.\.1 channels \(dim=3\)"):
        KVCacheConfig(3, outlier_channels=2)
    assert KVCacheConfig(4, outlier_channels=2).num_outlier_channels == 2


# -- immutability ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [("dim", 32), ("key_bits", 2), ("seed", 1), ("outlier_channels", 4)])
def test_kv_cache_config_is_frozen(name, value):
    config = KVCacheConfig(16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, name, value)
    assert config == KVCacheConfig(16)


def test_multi_head_config_is_frozen():
    config = MultiHeadConfig(2, KVCacheConfig(16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_heads = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.head_config = KVCacheConfig(32)


def test_replace_revalidates():
    config = KVCacheConfig(16, sink_tokens=2, max_tokens=5)
    assert dataclasses.replace(config, seed=9).seed == 9
    with pytest.raises(InvalidParameterError, match=r"max_tokens \(2\) must exceed sink_tokens \(2\)"):
        dataclasses.replace(config, max_tokens=2)


def test_configs_are_hashable_values():
    a = KVCacheConfig(16, outlier_channels=(3, 1))
    b = KVCacheConfig(16, outlier_channels=[1, 3])
    assert a == b and hash(a) == hash(b)
    assert len({a, b, KVCacheConfig(16)}) == 2


# -- round trips --------------------------------------------------------------------------------
ROUND_TRIP_CONFIGS = [
    KVCacheConfig(64),
    KVCacheConfig(2, key_bits=1, value_bits=8, seed=0),
    KVCacheConfig(128, key_bits=3, value_bits=2, key_strategy="prod", seed=2**40, max_tokens=4096,
                  rotation="hadamard", sketch="hadamard"),
    KVCacheConfig(64, sink_tokens=4, residual_tokens=32, max_tokens=1024, outlier_channels=8, outlier_bits=6),
    KVCacheConfig(16, key_strategy="PROD", key_bits=8, outlier_channels=(0, 7, 15)),
]


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS, ids=repr)
def test_kv_cache_config_round_trips(config):
    data = config.to_dict()
    assert set(data) == {field.name for field in dataclasses.fields(KVCacheConfig)}
    assert data["key_strategy"] in ("mse", "prod") and type(data["key_strategy"]) is str
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    assert KVCacheConfig.from_dict(data) == config
    text = config.to_json()
    assert json.loads(text) == data
    again = KVCacheConfig.from_json(text)
    assert again == config
    assert again.key_strategy is config.key_strategy
    assert again.outlier_channels == config.outlier_channels


def test_round_tripped_config_builds_an_identical_cache():
    config = ROUND_TRIP_CONFIGS[3]
    keys = np.random.default_rng(0).standard_normal((40, 64))
    a, b = QuantizedKVCache(config), QuantizedKVCache(KVCacheConfig.from_json(config.to_json()))
    a.append(keys, keys, n_threads=1)
    b.append(keys, keys, n_threads=1)
    for codes_a, codes_b in zip(a.quantized_codes(), b.quantized_codes()):
        assert codes_a == codes_b


def test_from_dict_rejects_unknown_and_missing_keys():
    data = KVCacheConfig(16).to_dict()
    with pytest.raises(InvalidParameterError, match=r"unknown KVCacheConfig fields: \['temperature'\]"):
        KVCacheConfig.from_dict({**data, "temperature": 1.0})
    with pytest.raises(InvalidParameterError, match=r"KVCacheConfig.from_dict needs a dict, got list"):
        KVCacheConfig.from_dict([("dim", 16)])
    with pytest.raises(InvalidParameterError, match=r"key_bits \(mse keys\) must be an integer in 1\.\.8, got 12"):
        KVCacheConfig.from_dict({**data, "key_bits": 12})
    # Missing fields take their defaults; "dim" has none.
    assert KVCacheConfig.from_dict({"dim": 16}) == KVCacheConfig(16)
    with pytest.raises(TypeError):
        KVCacheConfig.from_dict({"key_bits": 4})


def test_from_json_rejects_unknown_keys():
    with pytest.raises(InvalidParameterError, match=r"unknown KVCacheConfig fields: \['bits'\]"):
        KVCacheConfig.from_json('{"dim": 16, "bits": 4}')


# -- QuantStrategy ----------------------------------------------------------------------------
def test_quant_strategy_values_and_parsing():
    assert QuantStrategy("prod") is QuantStrategy.PROD
    assert QuantStrategy("mse") is QuantStrategy.MSE
    assert QuantStrategy.parse("PROD") is QuantStrategy.PROD
    assert QuantStrategy.parse("Mse") is QuantStrategy.MSE
    assert QuantStrategy.parse(QuantStrategy.PROD) is QuantStrategy.PROD
    assert str(QuantStrategy.PROD) == "prod"
    assert QuantStrategy.PROD == "prod"  # a str enum
    assert json.loads(json.dumps(QuantStrategy.PROD)) == "prod"
    assert QuantStrategy(json.loads(json.dumps(QuantStrategy.PROD))) is QuantStrategy.PROD
    with pytest.raises(ValueError):
        QuantStrategy("PROD")  # the constructor is exact; parse() is the lenient one
    for bad in ("", "mse ", "qjl", None, 2):
        with pytest.raises(InvalidParameterError, match=r"key_strategy must be 'mse' or 'prod'"):
            QuantStrategy.parse(bad)


# -- MultiHeadConfig -------------------------------------------------------------------------------
def test_multi_head_config_defaults_and_derived_values():
    config = MultiHeadConfig(4, KVCacheConfig(32, seed=5))
    assert config.num_query_heads == 4 and config.group_size == 1
    assert [config.head_seed(h) for h in range(4)] == [5, 1005, 2005, 3005]
    gqa = MultiHeadConfig(2, KVCacheConfig(32), num_query_heads=8)
    assert (gqa.num_query_heads, gqa.group_size) == (8, 4)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_heads": 0}, InvalidParameterError, r"num_heads must be an integer >= 1, got 0"),
    ({"num_heads": -2}, InvalidParameterError, r"num_heads must be an integer >= 1, got -2"),
    ({"num_heads": 2.0}, InvalidParameterError, r"num_heads must be an integer"),
    ({"num_query_heads": 0}, InvalidParameterError, r"num_query_heads must be an integer >= 1, got 0"),
    ({"num_query_heads": 7}, InvalidParameterError, r"num_query_heads \(7\) must be a multiple of num_heads \(2\)"),
    ({"num_query_heads": 1}, InvalidParameterError, r"num_query_heads \(1\) must be a multiple of num_heads \(2\)"),
    ({"num_query_heads": "8"}, InvalidParameterError, r"num_query_heads must be an integer"),
    ({"head_config": 16}, InvalidParameterError, r"head_config must be a KVCacheConfig, got int"),
    ({"head_config": {"dim": 16, "bits": 2}}, InvalidParameterError, r"unknown KVCacheConfig fields: \['bits'\]"),
    ({"head_config": {"dim": 1}}, InvalidParameterError, r"dim must be an integer >= 2, got 1"),
])
def test_multi_head_config_validation(kwargs, error, message):
    kwargs = {"num_heads": 2, "head_config": KVCacheConfig(16), **kwargs}
    with pytest.raises(error, match=message):
        MultiHeadConfig(**kwargs)


@pytest.mark.parametrize("config", [
    MultiHeadConfig(1, KVCacheConfig(16)),
    MultiHeadConfig(2, KVCacheConfig(64, key_strategy="prod", key_bits=3, sink_tokens=1, max_tokens=8),
                    num_query_heads=8),
    MultiHeadConfig(4, ROUND_TRIP_CONFIGS[4]),
], ids=repr)
def test_multi_head_config_round_trips(config):
    data = config.to_dict()
    assert set(data) == {"num_heads", "head_config", "num_query_heads"}
    assert MultiHeadConfig.from_dict(data) == config
    via_json = MultiHeadConfig.from_dict(json.loads(json.dumps(data)))
    assert via_json == config
    assert isinstance(via_json.head_config, KVCacheConfig)
    with pytest.raises(InvalidParameterError, match=r"unknown MultiHeadConfig fields: \['layers'\]"):
        MultiHeadConfig.from_dict({**data, "layers": 2})


def test_multi_head_config_accepts_head_config_dict():
    config = MultiHeadConfig(2, {"dim": 16, "key_strategy": "prod"})
    assert config.head_config == KVCacheConfig(16, key_strategy=QuantStrategy.PROD)


# -- stats records --------------------------------------------------------------------------------
def test_cache_stats_to_dict_is_json_ready():
    cache = QuantizedKVCache(KVCacheConfig(16, key_strategy="prod", residual_tokens=2))
    cache.append(np.ones((5, 16)), np.ones((5, 16)), n_threads=1)
    stats = cache.stats()
    data = stats.to_dict()
    assert data["key_strategy"] == "prod"
    assert json.loads(json.dumps(data)) == data
    assert CacheStats(**{**data, "key_strategy": QuantStrategy(data["key_strategy"])}) == stats
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.total_bytes = 0
