"""KV-cache quantizers users already run, as transformers cache layers (fake quantization).

* llama.cpp's cache types ``q4_0``, ``q5_0``, ``q8_0`` and ``iq4_nl``: blocks of 32
  along head_dim, one float16 scale per block, following ggml's reference
  quantizers (``quantize_row_*_ref``): q4_0 ``d = max / -8`` with ``max`` the
  signed element of largest magnitude and ``q = min(15, (int)(x / d + 8.5))``;
  q5_0 the same with ``d = max / -16`` and 32 levels; q8_0 ``d = amax / 127``,
  ``q = roundf(x / d)``; iq4_nl the non-linear table :data:`IQ4_NL_VALUES` with
  ggml's weighted scale search (weights ``x**2``, 15 trial scales around
  ``max / -127``). Each type is also available behind a rotation (``-rot``): K and
  V of every (layer, KV head) are multiplied by a fixed randomized Hadamard
  matrix before quantizing and by its transpose after dequantizing, as llama.cpp
  rotates Q, K and V with a Hadamard transform.
* KIVI (Liu et al. 2024) with 4 or 2 bits: keys per channel over groups of 32
  tokens, values per token over groups of 32 channels, asymmetric, float16 scale
  and zero point. The newest ``n % 32`` keys that do not yet fill a group stay in
  float16.
* transformers' ``QuantizedCache`` with the optimum-quanto backend (4 and 2
  bits, its defaults: groups of 64, 128 recent tokens in full precision), when
  ``optimum-quanto`` is installed.

Every cache is a ``transformers.Cache`` usable as ``past_key_values``. Keys and
values are quantized and dequantized as they enter, and the layer keeps the
dequantized tensors: the prompt attends exactly and is stored quantized (like
transformers' ``QuantizedCache``), every later token attends to the stored
tokens and to its own quantized key and value. ``stats()`` counts the bits the
format would hold: codes, scales, zero points and full-precision tokens.
"""

import dataclasses

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

BLOCK = 32
#: ggml's ``kvalues_iq4nl``.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
#: ggml's ``GROUP_MAX_EPS``: an iq4_nl block whose largest magnitude is below it is all zeros.
GROUP_MAX_EPS = 1e-15
#: ggml's ``ntry`` of the iq4_nl scale search.
IQ4_NL_TRIES = 7


# ---------------------------------------------------------------------------
# ggml block quantizers: (..., d) float32 -> dequantized (..., d), d % 32 == 0
# ---------------------------------------------------------------------------

def _blocks(x):
    if x.shape[-1] % BLOCK:
        raise ValueError(f"last dimension is {x.shape[-1]}; ggml block types need a multiple of {BLOCK}")
    return x.reshape(-1, BLOCK)


def _fp16(x):
    return x.to(torch.float16).to(torch.float32)


def _reciprocal(d):
    """``d ? 1/d : 0`` elementwise."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / safe)


def _signed_absmax(blocks):
    """The first element of largest magnitude of each block, with its sign, (n, 1)."""
    return blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))


def _offset_binary(x, levels):
    """q4_0 (levels 16) and q5_0 (32): ``d = max / -(levels/2)``, ``q = min(levels-1, (int)(x/d + levels/2 + 0.5))``."""
    blocks = _blocks(x)
    half = levels // 2
    d = _signed_absmax(blocks) / -half
    # x / d + half + 0.5 is >= 0, so the C cast to an integer is a floor.
    q = torch.clamp(torch.trunc(blocks * _reciprocal(d) + (half + 0.5)), max=levels - 1)
    return ((q - half) * _fp16(d)).reshape(x.shape)


def q4_0(x):
    """ggml ``q4_0`` round trip: 4-bit offset-binary codes, one float16 scale per 32 values."""
    return _offset_binary(x, 16)


def q5_0(x):
    """ggml ``q5_0`` round trip: 5-bit offset-binary codes, one float16 scale per 32 values."""
    return _offset_binary(x, 32)


def _roundf(x):
    """C ``roundf``: halves away from zero (``torch.round`` rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def q8_0(x):
    """ggml ``q8_0`` round trip: ``d = amax / 127``, ``q = roundf(x / d)``, float16 ``d``."""
    blocks = _blocks(x)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (_roundf(blocks * _reciprocal(d)) * _fp16(d)).reshape(x.shape)


def _iq4_nl_index(scaled, values):
    """ggml ``best_index_int8``: the nearest table entry, the upper one on a tie."""
    flat = scaled.contiguous()
    upper = torch.searchsorted(values, flat, right=True).clamp(1, len(values) - 1)
    below, above = values[upper - 1], values[upper]
    index = torch.where(flat - below < above - flat, upper - 1, upper)
    index = torch.where(flat <= values[0], torch.zeros_like(index), index)
    return torch.where(flat >= values[-1], torch.full_like(index, len(values) - 1), index)


def iq4_nl(x):
    """ggml ``iq4_nl`` round trip (``quantize_row_iq4_nl_ref``: no importance weights).

    Per block: start from ``d = max / 127`` (``max`` signed), try the inverse
    scales ``(t - 127) / max`` for ``t`` in -7..7, and keep the first candidate
    of largest ``sum(w q x)**2 / sum(w q q)`` (ggml's strict-improvement rule),
    with ``w = x**2``; its least-squares scale ``sum(w q x) / sum(w q q)`` is
    stored as float16 and the codes are recomputed with it.
    """
    blocks = _blocks(x)
    values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=x.device)
    weights = blocks * blocks
    top = _signed_absmax(blocks)
    tiny = top.abs() < GROUP_MAX_EPS
    top = torch.where(tiny, torch.ones_like(top), top)
    trials = torch.arange(-IQ4_NL_TRIES, IQ4_NL_TRIES + 1, dtype=torch.float32, device=x.device)
    inverse = torch.cat([1.0 / (-top / values[0]), (trials + values[0]) / top], dim=1)  # (n, 16)
    q = values[_iq4_nl_index(inverse[:, :, None] * blocks[:, None, :], values)]
    wq = weights[:, None, :] * q
    sumqx = (wq * blocks[:, None, :]).sum(-1)
    sumq2 = (wq * q).sum(-1)
    # Candidate 0 always counts; the trials only where sum(w q q) > 0.
    score = torch.where(sumq2 > 0, sumqx * sumqx / torch.where(sumq2 > 0, sumq2, 1.0), -torch.inf)
    score[:, 0] = (sumqx[:, 0] / sumq2[:, 0]) * sumqx[:, 0]
    best = score.argmax(-1, keepdim=True)
    d = sumqx.gather(-1, best) / sumq2.gather(-1, best)
    d = torch.where(tiny, torch.zeros_like(d), d)
    codes = _iq4_nl_index(blocks * _reciprocal(d), values)
    return (values[codes] * _fp16(d)).reshape(x.shape)


#: name -> (round trip, bits per value: codes + the float16 scale of each 32 values).
GGML_TYPES = {
    "q4_0": (q4_0, 4 + 16 / BLOCK),
    "q5_0": (q5_0, 5 + 16 / BLOCK),
    "q8_0": (q8_0, 8 + 16 / BLOCK),
    "iq4_nl": (iq4_nl, 4 + 16 / BLOCK),
}


def randomized_hadamard(dim, rng):
    """``H diag(s) / sqrt(dim)``: Sylvester Hadamard times random signs, (dim, dim) float32, orthogonal."""
    if dim & (dim - 1):
        raise ValueError(f"dim is {dim}; a Hadamard matrix needs a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    signs = rng.choice((-1.0, 1.0), size=dim)
    return torch.from_numpy((h * signs / np.sqrt(dim)).astype(np.float32))


# ---------------------------------------------------------------------------
# KIVI: asymmetric groups of 32 with float16 scale and zero point
# ---------------------------------------------------------------------------

def asymmetric_round_trip(x, bits, dim):
    """Quantize-dequantize ``x`` over groups of 32 along ``dim``: ``q = round((x - min) / s)``,
    ``s = (max - min) / (2**bits - 1)``, with ``s`` and ``min`` stored as float16."""
    moved = x.movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // BLOCK, BLOCK)
    low = _fp16(groups.amin(-1, keepdim=True))
    scale = _fp16((groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2**bits - 1))
    q = torch.clamp(torch.round((groups - low) * _reciprocal(scale)), 0, 2**bits - 1)
    return (q * scale + low).reshape(moved.shape).movedim(-1, dim)


# ---------------------------------------------------------------------------
# Cache layers
# ---------------------------------------------------------------------------

class FakeQuantLayer(DynamicLayer):
    """A layer that stores ``round_trip(keys)`` and ``round_trip(values)``.

    Parameters
    ----------
    round_trip : callable
        (batch, heads, tokens, head_dim) float32 -> same shape, dequantized.
    bits_per_value : float
        Bits the quantized format holds per key or value entry.
    rotation : torch.Tensor or None
        (heads, head_dim, head_dim) orthogonal matrices applied before quantizing
        (``x @ R.T``) and undone after dequantizing (``@ R``).
    """

    def __init__(self, round_trip, bits_per_value, rotation=None):
        super().__init__()
        self.round_trip = round_trip
        self.bits_per_value = bits_per_value
        self.rotation = rotation

    def _quantize(self, x):
        if self.rotation is None:
            return self.round_trip(x)
        rotated = torch.einsum("bhtd,hed->bhte", x, self.rotation)
        return torch.einsum("bhte,hed->bhtd", self.round_trip(rotated), self.rotation)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        # Empty (batch, heads, 0, head_dim) rather than DynamicLayer's 1-d empty tensors.
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]

    def _append(self, key_states, value_states):
        self.keys = torch.cat([self.keys, self._quantize(key_states)], dim=-2)
        self.values = torch.cat([self.values, self._quantize(value_states)], dim=-2)

    def update(self, key_states, value_states, *args, **kwargs):
        prefill = not self.is_initialized
        if prefill:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        if prefill:
            return key_states, value_states
        return self.keys, self.values

    def held_bits(self):
        return 2 * self.keys.numel() * self.bits_per_value if self.is_initialized else 0


class KiviLayer(FakeQuantLayer):
    """KIVI with ``bits`` bits: per-channel keys over 32 tokens, per-token values over 32 channels.

    ``self.keys`` is the quantized groups followed by the float16 tail of the
    newest keys that do not fill a group yet.
    """

    def __init__(self, bits):
        super().__init__(None, bits + 32 / BLOCK)
        self.bits = bits
        self.tail = 0

    def _append(self, key_states, value_states):
        done = self.keys[..., : self.keys.shape[-2] - self.tail, :]
        pending = torch.cat([self.keys[..., done.shape[-2]:, :], _fp16(key_states)], dim=-2)
        full = pending.shape[-2] // BLOCK * BLOCK
        grouped = asymmetric_round_trip(pending[..., :full, :], self.bits, dim=-2)
        self.keys = torch.cat([done, grouped, pending[..., full:, :]], dim=-2)
        self.tail = pending.shape[-2] - full
        self.values = torch.cat([self.values, asymmetric_round_trip(value_states, self.bits, dim=-1)], dim=-2)

    def held_bits(self):
        if not self.is_initialized:
            return 0
        per_row = self.keys.numel() // max(self.keys.shape[-2], 1)  # batch * heads * head_dim
        tail_bits = per_row * self.tail * 16
        return tail_bits + (2 * self.keys.numel() - per_row * self.tail) * self.bits_per_value


@dataclasses.dataclass(frozen=True)
class HeldBytes:
    """What a cache holds: ``total_bytes`` for ``num_values`` key and value entries."""

    total_bytes: float
    num_values: int

    @property
    def bits_per_value(self):
        return 8.0 * self.total_bytes / self.num_values if self.num_values else 0.0


class FakeQuantCache(Cache):
    """A ``transformers.Cache`` of one :class:`FakeQuantLayer` (or subclass) per model layer."""

    def __init__(self, layers):
        super().__init__(layers=layers)

    def stats(self):
        return HeldBytes(sum(layer.held_bits() for layer in self.layers) / 8.0,
                         sum(2 * layer.keys.numel() for layer in self.layers if layer.is_initialized))


# ---------------------------------------------------------------------------
# The baselines by name
# ---------------------------------------------------------------------------

def _kv_shape(config):
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def ggml_cache(config, type_name, *, rotate=False, seed=0):
    """A :class:`FakeQuantCache` of the ggml type ``type_name``, optionally rotated."""
    round_trip, bits = GGML_TYPES[type_name]
    layers, heads, head_dim = _kv_shape(config)
    out = []
    for layer in range(layers):
        rotation = None
        if rotate:
            rotation = torch.stack([randomized_hadamard(head_dim, np.random.default_rng([seed, layer, head]))
                                    for head in range(heads)])
        out.append(FakeQuantLayer(round_trip, bits, rotation))
    return FakeQuantCache(out)


def kivi_cache(config, bits):
    return FakeQuantCache([KiviLayer(bits) for _ in range(config.num_hidden_layers)])


def identity_cache(config):
    """float32 through the fake-quantization layers: must match ``DynamicCache`` exactly."""
    return FakeQuantCache([FakeQuantLayer(lambda x: x, 32.0) for _ in range(config.num_hidden_layers)])


def quanto_available():
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def quanto_cache(config, bits):
    """transformers' ``QuantizedCache(backend="quanto", nbits=bits)`` with its default options."""
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=config, nbits=bits)


def _tensor_bytes(tensor):
    """Bytes of a tensor, through the inner tensors of a tensor subclass (quanto's QTensor)."""
    if tensor is None:
        return 0
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not torch.Tensor:
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def held_bytes(cache):
    """:class:`HeldBytes` of any cache of this module, a ``QuantizedCache`` or a ``DynamicCache``."""
    stats = getattr(cache, "stats", None)
    if stats is not None:
        return stats()
    total = values = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        quantized = (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None))
        total += sum(_tensor_bytes(t) for t in (*quantized, layer.keys, layer.values))
        per_token = layer.keys.numel() // max(layer.keys.shape[-2], 1) if layer.keys.dim() == 4 else 0
        if quantized[0] is not None:
            per_token = quantized[0].numel() // quantized[0].shape[-2]
        values += 2 * per_token * layer.get_seq_length()
    return HeldBytes(total, values)


#: baseline name -> (label, factory(config) -> cache)
BASELINES = {
    **{name: (name, lambda config, name=name: ggml_cache(config, name)) for name in GGML_TYPES},
    **{f"{name}-rot": (f"{name} + Hadamard rotation", lambda config, name=name: ggml_cache(config, name, rotate=True))
       for name in GGML_TYPES},
    "kivi4": ("KIVI-4", lambda config: kivi_cache(config, 4)),
    "kivi2": ("KIVI-2", lambda config: kivi_cache(config, 2)),
    "quanto4": ("QuantizedCache quanto 4-bit", lambda config: quanto_cache(config, 4)),
    "quanto2": ("QuantizedCache quanto 2-bit", lambda config: quanto_cache(config, 2)),
    "fp32": ("float32 through FakeQuantCache", identity_cache),
}
DEFAULT_BASELINES = ("q4_0", "q4_0-rot", "q5_0", "q5_0-rot", "q8_0", "q8_0-rot", "iq4_nl", "iq4_nl-rot",
                     "kivi4", "kivi2", "quanto4", "quanto2")
