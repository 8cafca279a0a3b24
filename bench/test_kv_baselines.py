"""The baselines of ``bench/real_model.py`` against independent references.

q4_0, q5_0 and q8_0 against the ``gguf`` package's numpy port of ggml (bit-exact
by its own claim); iq4_nl against a per-block loop over ggml's scale search; KIVI
against a direct per-group computation; the cache layers against
``DynamicLayer`` and the bit counts against the formats' definitions.

    python -m pytest bench/test_kv_baselines.py
"""

import numpy as np
import pytest
import torch

kb = pytest.importorskip("kv_baselines")


def decoder_like(shape, seed):
    """Gaussian rows with a few channels 10x larger, float32, as torch."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., ::17] *= 10
    return torch.from_numpy(x)


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0"])
def test_ggml_types_match_gguf(name):
    quants = pytest.importorskip("gguf.quants")
    qtype = getattr(quants.GGMLQuantizationType, name.upper())
    x = decoder_like((2, 3, 97, 64), seed=1)
    x[0, 0, 0] = 0  # all-zero blocks have d = 0
    expected = quants.dequantize(quants.quantize(x.numpy().reshape(-1, 64), qtype), qtype)
    round_trip, _ = kb.GGML_TYPES[name]
    np.testing.assert_array_equal(round_trip(x).numpy().reshape(-1, 64), expected)


def iq4_nl_block(x):
    """ggml's iq4_nl search for one block of 32, written as a loop (no importance weights)."""
    values = np.array(kb.IQ4_NL_VALUES, dtype=np.float32)

    def nearest(a):
        if a <= values[0]:
            return 0
        if a >= values[-1]:
            return 15
        upper = int(np.searchsorted(values, a, side="right"))
        return upper - 1 if a - values[upper - 1] < values[upper] - a else upper

    def sums(inverse):
        q = np.array([values[nearest(np.float32(inverse * v))] for v in x], dtype=np.float32)
        w = x * x
        return np.float32(np.sum(w * q * x)), np.float32(np.sum(w * q * q))

    top = x[np.argmax(np.abs(x))]
    if abs(top) < kb.GROUP_MAX_EPS:
        return np.zeros_like(x)
    sumqx, sumq2 = sums(np.float32(1) / (-top / values[0]))
    d = sumqx / sumq2
    best = d * sumqx
    for t in range(-kb.IQ4_NL_TRIES, kb.IQ4_NL_TRIES + 1):
        sumqx, sumq2 = sums((t + values[0]) / top)
        if sumq2 > 0 and sumqx * sumqx / sumq2 > best:
            d = sumqx / sumq2
            best = d * sumqx
    inverse = np.float32(1) / d if d else np.float32(0)
    codes = [nearest(np.float32(inverse * v)) for v in x]
    return values[codes] * np.float32(np.float16(d))


def test_iq4_nl_matches_block_loop():
    x = decoder_like((40, 64), seed=2)
    x[3, :32] = 0
    expected = np.stack([iq4_nl_block(block) for block in x.numpy().reshape(-1, 32)])
    np.testing.assert_allclose(kb.iq4_nl(x).numpy().reshape(-1, 32), expected, rtol=1e-6, atol=0)


def test_iq4_nl_beats_its_starting_scale():
    x = decoder_like((200, 32), seed=3)
    error = ((kb.iq4_nl(x) - x) ** 2).sum()
    values = torch.tensor(kb.IQ4_NL_VALUES, dtype=torch.float32)
    d = (kb._signed_absmax(x) / 127)
    start = values[kb._iq4_nl_index(x / d, values)] * d
    assert error < ((start - x) ** 2).sum()


def test_asymmetric_round_trip_per_group():
    x = decoder_like((2, 3, 64, 64), seed=4)
    for dim in (-1, -2):
        out = kb.asymmetric_round_trip(x, 4, dim)
        group = x[0, 1, :32, 5] if dim == -2 else x[0, 1, 5, :32]
        low = np.float32(np.float16(group.min()))
        scale = np.float32(np.float16((group.max() - group.min()) / 15))
        q = np.clip(np.round((group.numpy() - low) / scale), 0, 15)
        got = out[0, 1, :32, 5] if dim == -2 else out[0, 1, 5, :32]
        np.testing.assert_allclose(got.numpy(), q * scale + low, rtol=1e-6)


def test_randomized_hadamard_is_orthogonal():
    r = kb.randomized_hadamard(64, np.random.default_rng(0)).double()
    np.testing.assert_allclose((r @ r.T).numpy(), np.eye(64), atol=1e-12)


class Config:
    num_hidden_layers = 2
    num_attention_heads = 6
    num_key_value_heads = 3
    hidden_size = 6 * 64


def feed(cache, steps):
    """Prompt of 37 tokens then ``steps`` single tokens through layer 0; the returned keys and values."""
    out = []
    for t, length in enumerate([37] + [1] * steps):
        k = decoder_like((2, 3, length, 64), seed=10 + t)
        v = decoder_like((2, 3, length, 64), seed=100 + t)
        out.append(cache.update(k, v, 0))
        cache.update(k, v, 1)
    return out


def test_prompt_attends_exactly_then_tokens_see_their_own_quantized_key():
    cache = kb.ggml_cache(Config, "q4_0", rotate=True)
    (k0, v0), (k1, v1) = feed(cache, 1)
    np.testing.assert_array_equal(k0.numpy(), decoder_like((2, 3, 37, 64), seed=10).numpy())
    last = decoder_like((2, 3, 1, 64), seed=11)
    assert k1.shape == (2, 3, 38, 64)
    assert not torch.equal(k1[..., -1:, :], last)
    assert torch.allclose(k1[..., -1:, :], last, atol=0.5 * last.abs().max())


def test_identity_cache_matches_dynamic_layer():
    from transformers.cache_utils import DynamicCache

    for (k, v), (k_ref, v_ref) in zip(feed(kb.identity_cache(Config), 3), feed(DynamicCache(), 3)):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("name, bits", [("q4_0", 4.5), ("q8_0-rot", 8.5), ("iq4_nl", 4.5), ("q5_0", 5.5)])
def test_ggml_bits(name, bits):
    cache = kb.BASELINES[name][1](Config)
    feed(cache, 4)
    assert kb.held_bytes(cache).bits_per_value == bits


def test_kivi_tail_and_bits():
    cache = kb.kivi_cache(Config, 2)
    (k0, _), *rest = feed(cache, 30)
    layer = cache.layers[0]
    assert layer.tail == (37 + 30) % 32 == 3
    keys = torch.cat([decoder_like((2, 3, 37, 64), seed=10)]
                     + [decoder_like((2, 3, 1, 64), seed=11 + t) for t in range(30)], dim=-2)
    np.testing.assert_array_equal(layer.keys[..., -3:, :].numpy(), kb._fp16(keys[..., -3:, :]).numpy())
    np.testing.assert_array_equal(layer.keys[..., :64, :].numpy(),
                                  kb.asymmetric_round_trip(kb._fp16(keys[..., :64, :]), 2, -2).numpy())
    per_row = 2 * 3 * 64
    expected = (per_row * 3 * 16 + (2 * 67 - 3) * per_row * 3) / (2 * 67 * per_row)
    assert kb.held_bytes(cache).bits_per_value == pytest.approx(expected)


def test_dynamic_cache_holds_32_bits():
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    feed(cache, 2)
    assert kb.held_bytes(cache).bits_per_value == 32.0
