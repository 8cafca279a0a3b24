"""Decode attention from TurboQuant codes against torch's scaled_dot_product_attention.

    python bench/sdpa_speed.py                    # markdown table
    python bench/sdpa_speed.py --threads 1 --rounds 50

One decode read of a grouped-query layer (8 KV heads, 32 query heads, head dim
128; one query token) over ``n`` cached tokens: torch's
``scaled_dot_product_attention`` on the float32 and on the bfloat16 cache
(``enable_gqa=True``, no copy of the KV heads), against
``MultiHeadKVCache.attention_output_all`` of 4-bit MSE codes and of the
presets, float32 queries. Rounds of all methods are interleaved; the table
gives the minimum over the rounds and ``SDPA time / our time`` (> 1: we are
faster). torch is needed (``pip install torch``); both sides use the same
number of threads.
"""

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from reference import (command_line, environment_lines, interleaved_minima, load_average,
                       prefer_in_place_build, source_digest)

prefer_in_place_build()
import turboquant as tq  # noqa: E402

KV_HEADS, QUERY_HEADS, DIM = 8, 32, 128
LENGTHS = (4096, 32768)
OURS = {"4-bit MSE": None, "balanced": "balanced", "compact": "compact"}


def readers(n, n_threads, torch):
    """``{method: zero-argument function doing one decode read}`` over the same tokens."""
    rng = np.random.default_rng(n)
    keys = rng.standard_normal((KV_HEADS, n, DIM), dtype=np.float32) + 0.5
    values = rng.standard_normal((KV_HEADS, n, DIM), dtype=np.float32)
    queries = rng.standard_normal((QUERY_HEADS, DIM), dtype=np.float32)
    out = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for name, dtype in (("SDPA float32", torch.float32), ("SDPA bfloat16", torch.bfloat16)):
        k = torch.from_numpy(keys)[None].to(dtype)
        v = torch.from_numpy(values)[None].to(dtype)
        q = torch.from_numpy(queries)[None, :, None, :].to(dtype)
        out[name] = (lambda q=q, k=k, v=v: sdpa(q, k, v, enable_gqa=True))
    for name, preset in OURS.items():
        head = tq.KVCacheConfig(DIM) if preset is None else tq.KVCacheConfig.preset(preset, DIM)
        cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(KV_HEADS, head, num_query_heads=QUERY_HEADS))
        cache.append_all(keys, values)
        out[name] = (lambda cache=cache: cache.attention_output_all(queries, n_threads=n_threads))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per method (default 30)")
    parser.add_argument("--threads", type=int, default=1, help="threads of torch and turboquant (default 1)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("sdpa_speed.py needs torch: pip install torch")
    torch.set_num_threads(args.threads)
    load_at_start = load_average()
    results = []
    for n in LENGTHS:
        with torch.inference_mode():
            best = interleaved_minima(readers(n, args.threads, torch), args.rounds)
        results.append((n, best))
        print(f"n={n}: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in best.items()), file=sys.stderr)
    print(f"Command: `{command_line('sdpa_speed.py', argv)}`\n")
    for line in environment_lines(load_at_start, source_digest()):
        print(f"- {line}")
    print(f"- torch {torch.__version__}, {args.threads} thread(s) on both sides\n")
    print("| n | method | us | SDPA float32 / this | SDPA bfloat16 / this |")
    print("|---:|---|---:|---:|---:|")
    for n, best in results:
        for name, seconds in best.items():
            print(f"| {n} | {name} | {seconds * 1e6:.0f} | {best['SDPA float32'] / seconds:.2f}x "
                  f"| {best['SDPA bfloat16'] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
