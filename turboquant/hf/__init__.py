"""A transformers cache holding TurboQuant codes, with decode attention computed from them.

Needs the ``hf`` extra (``pip install "cyturboquant[hf]"``: torch and
transformers 5.x); ``import turboquant`` itself never imports them.

Importing this module registers the attention implementation ``"turboquant"``
with :class:`transformers.AttentionInterface` (and sdpa's mask function under
the same name with :class:`transformers.AttentionMaskInterface`), so
``model.set_attn_implementation("turboquant")`` and
``attn_implementation="turboquant"`` work.
"""

_EXTRA = 'pip install "cyturboquant[hf]"'

try:
    import torch  # noqa: F401
    import transformers
except ImportError as error:
    raise ImportError(f"turboquant.hf needs torch and transformers: {_EXTRA}") from error

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"turboquant.hf needs transformers>=5.0 (found {transformers.__version__}): {_EXTRA}")

from ._attention import ATTENTION_NAME, register_attention, turboquant_attention_forward  # noqa: E402
from ._cache import TurboQuantCache, TurboQuantCacheStats, TurboQuantLayer  # noqa: E402

register_attention()

__all__ = [
    "ATTENTION_NAME",
    "TurboQuantCache",
    "TurboQuantCacheStats",
    "TurboQuantLayer",
    "register_attention",
    "turboquant_attention_forward",
]
