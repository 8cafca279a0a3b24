"""Decode attention speed of every KV-cache configuration against the 4-bit MSE fused path.

    python bench/attention_speed.py                       # markdown table
    python bench/attention_speed.py --rounds 50 --threads 1
    python bench/attention_speed.py --configs balanced 8/8

Per case, caches of every configuration hold the same ``n`` random tokens
(float32 standard normal keys with an offset of 0.5, values, queries); one
decode read is timed: ``QuantizedKVCache.attention_output`` of one float32 query
(one head), or ``MultiHeadKVCache.attention_output_all`` of one query per query
head (grouped-query attention). The baseline is ``KVCacheConfig(dim)``: 4-bit
MSE keys and values, the fused float32 kernel. Rounds of all configurations are
interleaved so they see the same machine load; the table gives the minimum over
the rounds and ``time / baseline time`` (target: <= 1.5).
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

BASELINE = "4-bit MSE"
#: name -> KVCacheConfig options (a preset's name: the preset).
CONFIGS = {
    "balanced": "balanced",
    "compact": "compact",
    "lossless": "lossless",
    "4/4 + 4 sinks + 32 recent": dict(sink_tokens=4, residual_tokens=32),
    "5/3": dict(key_bits=5, value_bits=3),
    "5/5": dict(key_bits=5, value_bits=5),
    "6/6": dict(key_bits=6, value_bits=6),
    "7/7": dict(key_bits=7, value_bits=7),
    "8/8": dict(key_bits=8, value_bits=8),
    "2/2": dict(key_bits=2, value_bits=2),
    "centered + 4 outliers": dict(center_keys=True, outlier_channels=4),
    "Prod 4": dict(key_strategy="prod"),
}
#: (label, heads, query heads, dim, n); heads == 0 is one QuantizedKVCache.
CASES = (
    ("one head", 0, 1, 64, 4096),
    ("one head", 0, 1, 128, 4096),
    ("one head", 0, 1, 128, 32768),
    ("GQA 3/9 heads (SmolLM2)", 3, 9, 64, 1024),
    ("GQA 8/32 heads", 8, 32, 128, 4096),
)


def configs(dim, names):
    out = {BASELINE: tq.KVCacheConfig(dim)}
    for name in names:
        options = CONFIGS[name]
        out[name] = (tq.KVCacheConfig.preset(options, dim) if isinstance(options, str)
                     else tq.KVCacheConfig(dim, **options))
    return out


def make_reader(config, heads, query_heads, n, n_threads, rng_seed=0):
    """A zero-argument function doing one decode read over a filled cache."""
    rng = np.random.default_rng(rng_seed)
    dim = config.dim
    if heads == 0:
        cache = tq.QuantizedKVCache(config)
        cache.append(rng.standard_normal((n, dim), dtype=np.float32) + 0.5,
                     rng.standard_normal((n, dim), dtype=np.float32))
        query = rng.standard_normal(dim, dtype=np.float32)
        return lambda: cache.attention_output(query, n_threads=n_threads)
    cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, config, num_query_heads=query_heads))
    cache.append_all(rng.standard_normal((heads, n, dim), dtype=np.float32) + 0.5,
                     rng.standard_normal((heads, n, dim), dtype=np.float32))
    queries = rng.standard_normal((query_heads, dim), dtype=np.float32)
    return lambda: cache.attention_output_all(queries, n_threads=n_threads)


def time_case(case, names, rounds, n_threads):
    """``{config name: fastest seconds}``, rounds interleaved."""
    _, heads, query_heads, dim, n = case
    return interleaved_minima({name: make_reader(config, heads, query_heads, n, n_threads)
                               for name, config in configs(dim, names).items()}, rounds)


def table(results, names, command, load_at_start):
    """One row per configuration, per case its time and ``time / baseline``."""
    lines = [f"Command: `{command}`", ""]
    lines += [f"- {line}" for line in environment_lines(load_at_start, source_digest())]
    header = [f"{label}, d={dim}, n={n}" for (label, _, _, dim, n), _ in results]
    lines += ["", "| configuration | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for name in [BASELINE, *names]:
        cells = []
        for _, timings in results:
            best, base = timings[name], timings[BASELINE]
            cells.append(f"{best * 1e6:.0f} us" + ("" if name == BASELINE else f" ({best / base:.2f}x)"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per configuration (default 30)")
    parser.add_argument("--threads", type=int, default=None, help="n_threads of every call (default: OpenMP's)")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS),
                        help="configurations timed against the baseline (default: all)")
    args = parser.parse_args(argv)
    load_at_start = load_average()
    results = []
    for case in CASES:
        timings = time_case(case, args.configs, args.rounds, args.threads)
        results.append((case, timings))
        print(f"{case[0]} d={case[3]} n={case[4]}: " + ", ".join(
            f"{name} {seconds * 1e6:.0f} us" for name, seconds in timings.items()), file=sys.stderr, flush=True)
    print(table(results, args.configs, command_line("attention_speed.py", argv), load_at_start))


if __name__ == "__main__":
    main()
