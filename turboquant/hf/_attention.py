"""The ``"turboquant"`` attention implementation: decode steps of a
:class:`TurboQuantCache` are computed from the codes, every other call is sdpa's."""

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._errors import InvalidParameterError

ATTENTION_NAME = "turboquant"
"""Name of the attention implementation registered with transformers."""

# The attribute a decode step's placeholder key tensor carries: the layer that
# holds the codes.
DECODE_LAYER_ATTRIBUTE = "_turboquant_layer"


def register_attention():
    """Register :func:`turboquant_attention_forward` as ``"turboquant"`` (idempotent).

    The mask function registered under the same name is sdpa's, so the model
    builds boolean masks (``True`` = attend) exactly as for ``"sdpa"``.
    """
    AttentionInterface.register(ATTENTION_NAME, turboquant_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def turboquant_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of transformers' ``AttentionInterface``, served from TurboQuant codes on decode steps.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (``num_key_value_groups``, ``head_dim`` are read).
    query : torch.Tensor, shape (batch, num_heads, q_len, head_dim)
    key, value : torch.Tensor, shape (batch, kv_heads, kv_len, head_dim)
        Exact states, or the placeholders a :class:`TurboQuantLayer` returns for
        a decode step.
    attention_mask : torch.Tensor or None
        sdpa's mask: boolean ``(batch, 1, q_len, kv_len)`` with ``True`` where
        attention is allowed, or ``None`` (causal, no padding).
    dropout : float, default=0.0
    scaling : float or None, default=None
        Score scale; ``None`` means ``head_dim ** -0.5``.
    **kwargs
        Passed on to sdpa (``softcap``, ``s_aux``, ``sliding_window``, ...).

    Returns
    -------
    attn_output : torch.Tensor, shape (batch, q_len, num_heads, head_dim)
        In the query's dtype and device.
    attn_weights : None
        ``None`` unless a model's eager function served the call.

    Notes
    -----
    A decode step (one query token over a :class:`TurboQuantLayer`) computes
    ``softmax(q k^T * scaling) v`` for every batch row from the codes, over
    the row's allowed keys, which the mask must give as a contiguous suffix
    (left padding). Anything it cannot serve that way (a mask with holes,
    dropout, ``softcap``, attention sinks) is computed exactly over the
    dequantized keys and values instead. Every other call goes to sdpa, or to
    the model's own eager function when it needs ``softcap`` or attention
    sinks, which sdpa lacks.
    """
    layer = getattr(key, DECODE_LAYER_ATTRIBUTE, None)
    if layer is not None:
        starts = _decode_starts(attention_mask, query, layer)
        if starts is not None and not dropout and not _needs_eager(module, kwargs):
            return layer.decode_attention(query, scaling, starts), None
        key, value = layer.dequantized()
    return exact_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def exact_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """sdpa over exact tensors; the model's eager function where sdpa lacks a feature."""
    if not _needs_eager(module, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise InvalidParameterError(
            f"{type(module).__name__} uses softcap or attention sinks, which sdpa does not support, "
            "and its module has no eager_attention_forward; use another attention implementation")
    mask = _additive_mask(attention_mask, query, key)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _needs_eager(module, kwargs):
    return (kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or getattr(module, "sinks", None) is not None)


def _additive_mask(mask, query, key):
    """sdpa's boolean (or absent) mask as the float mask eager functions add to the scores."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if q_len == 1:
            return None
        # sdpa's is_causal, lower-right aligned as transformers' masks are.
        rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def _decode_starts(mask, query, layer):
    """Per batch row, the first key the query may attend to, when every row's
    allowed keys are a contiguous suffix of the layer's tokens; otherwise None."""
    batch, q_len = query.shape[0], query.shape[2]
    if q_len != 1 or batch != layer.batch_size:
        return None
    n = layer.get_seq_length()
    if mask is None:
        return [0] * batch
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[2] != 1 or mask.shape[3] != n \
            or mask.shape[0] not in (1, batch):
        return None
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        if not (allowed | (mask <= torch.finfo(mask.dtype).min)).all():
            return None  # a bias on the scores, not just a mask
    else:
        return None
    if mask.shape[1] > 1 and not (allowed == allowed[:, :1]).all():
        return None
    allowed = allowed[:, 0, 0, :].expand(batch, n)
    count = allowed.sum(dim=-1)
    first = torch.argmax(allowed.to(torch.int8), dim=-1)
    if not bool(((count > 0) & (count == n - first)).all()):
        return None
    return first.tolist()
