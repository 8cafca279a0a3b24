"""The model commands of the command-line tool (``kv eval``, ``generate``): the hf extra, imported lazily."""

import os
import time

import numpy as np

from ._progress import Progress
from ._vectors import UsageError

PRESET_OPTIONS = {"4bit": {}, "lossless": {"preset": "lossless"}, "balanced": {"preset": "balanced"},
                  "compact": {"preset": "compact"}}


def _transformers():
    try:
        import torch
        import transformers

        from .. import hf
    except ImportError as error:
        raise UsageError(f'model commands need the hf extra: pip install "cyturboquant[hf]" ({error})') from None
    return torch, transformers, hf


def load_model(path):
    """``(model, tokenizer)`` from a transformers folder or a .gguf file (nothing is downloaded)."""
    torch, transformers, _ = _transformers()
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        folder, extra = path, {}
    elif path.endswith(".gguf"):
        folder, extra = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    else:
        raise UsageError(f"{path}: expected a transformers model folder or a .gguf file")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                                  torch_dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"{path}: cannot load a causal language model ({str(error).splitlines()[0]})") from None
    return model.eval(), tokenizer


def _cache_bytes(cache):
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "element_size"):
                total += tensor.numel() * tensor.element_size()
    return total


def _decode_logits(model, ids, prompt, cache, torch, progress):
    """Log-probabilities of every next token after the prompt, decoded one token at a time."""
    out = []
    with torch.no_grad():
        result = model(ids[:, :prompt], past_key_values=cache, use_cache=True)
        out.append(torch.log_softmax(result.logits[:, -1].float(), -1))
        for position in range(prompt, ids.shape[1] - 1):
            result = model(ids[:, position:position + 1], past_key_values=cache, use_cache=True)
            out.append(torch.log_softmax(result.logits[:, -1].float(), -1))
            progress.update(1)
    return torch.cat(out)


def kv_eval(model_path, text_path, *, tokens, prompt, presets, quiet, threads):
    """Next-token KL, top-1 agreement and bits per value of each preset's cache
    against the exact (DynamicCache) one, teacher-forced over the text."""
    torch, transformers, hf = _transformers()
    if not os.path.exists(text_path):
        raise UsageError(f"{text_path}: no such file")
    with open(text_path, encoding="utf-8", errors="replace") as file:
        text = file.read()
    model, tokenizer = load_model(model_path)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < prompt + 2:
        raise UsageError(f"{text_path}: {ids.shape[1]} tokens; need at least --prompt + 2 = {prompt + 2}")
    steps = ids.shape[1] - prompt - 1
    with Progress(steps * (len(presets) + 1), "kv eval", quiet=quiet, unit="tokens") as bar:
        reference = _decode_logits(model, ids, prompt, transformers.DynamicCache(), torch, bar)
        rows = []
        for name in presets:
            cache = hf.TurboQuantCache(model.config, n_threads=threads, **PRESET_OPTIONS[name])
            logits = _decode_logits(model, ids, prompt, cache, torch, bar)
            kl = torch.sum(reference.exp() * (reference - logits), -1)
            rows.append({"name": name, "bits_per_value": cache.stats().bits_per_value,
                         "kl": float(kl.mean()), "top1": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())})
        model.config._attn_implementation = "sdpa"
    return {"model": model_path, "text": text_path, "tokens": int(ids.shape[1]), "prompt": prompt,
            "presets": rows}


def generate(model_path, prompt, *, preset, new_tokens, stream, threads):
    """Greedy text from ``prompt`` with a TurboQuantCache (streamed to stdout when
    ``stream``), then the same with DynamicCache: tokens/s and cache bytes of both."""
    torch, transformers, hf = _transformers()
    model, tokenizer = load_model(model_path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UsageError("the prompt is empty")
    streamer = transformers.TextStreamer(tokenizer, skip_prompt=True) if stream else None
    cache = hf.TurboQuantCache(model.config, preset=preset, n_threads=threads)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                             streamer=streamer, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - started
    produced = out.shape[1] - ids.shape[1]
    model.config._attn_implementation = "sdpa"
    dynamic = transformers.DynamicCache()
    started = time.perf_counter()
    with torch.no_grad():
        reference = model.generate(ids, past_key_values=dynamic, max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
    dynamic_seconds = time.perf_counter() - started
    return {"model": model_path, "preset": preset, "prompt_tokens": int(ids.shape[1]), "new_tokens": int(produced),
            "text": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
            "tokens_per_second": produced / max(seconds, 1e-9),
            "dynamic_tokens_per_second": (reference.shape[1] - ids.shape[1]) / max(dynamic_seconds, 1e-9),
            "cache_bytes": cache.stats().total_bytes, "dynamic_cache_bytes": _cache_bytes(dynamic),
            "same_tokens_as_dynamic_cache": bool(np.array_equal(out.numpy(), reference.numpy()))}
