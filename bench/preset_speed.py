"""Decode attention speed of the KV-cache presets against the 4-bit MSE fused path.

    python bench/preset_speed.py                # markdown table
    python bench/preset_speed.py --rounds 50 --threads 1

Per case, caches of every configuration hold the same ``n`` random tokens
(float32 standard normal keys with an offset of 0.5, values, queries); one
decode read is timed: ``QuantizedKVCache.attention_output`` of one float32 query
(one head), or ``MultiHeadKVCache.attention_output_all`` of one query per query
head (grouped-query attention). The baseline is ``KVCacheConfig(dim)``: 4-bit
MSE keys and values, the fused float32 kernel. Rounds of all configurations are
interleaved so they see the same machine load; the table gives the minimum over
the rounds and ``time / baseline time`` (the presets' target: <= 1.5).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
if any(name.startswith("_core.") for name in os.listdir(os.path.join(ROOT, "turboquant", "_kernels"))):
    sys.path.insert(1, ROOT)

import turboquant as tq  # noqa: E402
from reference import environment_lines, load_average, source_digest  # noqa: E402

BASELINE = "4-bit MSE"
PRESETS = ("balanced", "compact", "lossless")
#: (label, heads, query heads, dim, n); heads == 0 is one QuantizedKVCache.
CASES = (
    ("one head", 0, 1, 64, 4096),
    ("one head", 0, 1, 128, 4096),
    ("one head", 0, 1, 128, 32768),
    ("GQA 3/9 heads (SmolLM2)", 3, 9, 64, 1024),
    ("GQA 8/32 heads", 8, 32, 128, 4096),
)


def configs(dim):
    out = {BASELINE: tq.KVCacheConfig(dim)}
    out.update({name: tq.KVCacheConfig.preset(name, dim) for name in PRESETS})
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


def time_case(case, rounds, n_threads):
    """``{config name: [seconds per round]}``, rounds interleaved."""
    _, heads, query_heads, dim, n = case
    readers = {name: make_reader(config, heads, query_heads, n, n_threads)
               for name, config in configs(dim).items()}
    timings = {name: [] for name in readers}
    for reader in readers.values():
        reader()                               # warm-up
    names = list(readers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            readers[name]()
            timings[name].append(time.perf_counter() - start)
    return timings


def table(results, command, load_at_start):
    lines = [f"Command: `{command}`", ""]
    lines += [f"- {line}" for line in environment_lines(load_at_start, source_digest())]
    lines += ["", "| case | dim | n | " + " | ".join(f"{name} us" for name in [BASELINE, *PRESETS])
              + " | " + " | ".join(f"{name} / base" for name in PRESETS) + " |",
              "|---|---:|---:|" + "---:|" * (1 + 2 * len(PRESETS))]
    for (label, _, _, dim, n), timings in results:
        best = {name: min(values) for name, values in timings.items()}
        base = best[BASELINE]
        cells = [f"{best[name] * 1e6:.0f}" for name in [BASELINE, *PRESETS]]
        cells += [f"{best[name] / base:.2f}" for name in PRESETS]
        lines.append(f"| {label} | {dim} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per configuration (default 30)")
    parser.add_argument("--threads", type=int, default=None, help="n_threads of every call (default: OpenMP's)")
    args = parser.parse_args(argv)
    load_at_start = load_average()
    results = []
    for case in CASES:
        timings = time_case(case, args.rounds, args.threads)
        results.append((case, timings))
        print(f"{case[0]} d={case[3]} n={case[4]}: " + ", ".join(
            f"{name} {min(values) * 1e6:.0f} us" for name, values in timings.items()), file=sys.stderr, flush=True)
    command = "python bench/preset_speed.py" + ("" if not (argv or sys.argv[1:]) else
                                                " " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(table(results, command, load_at_start))


if __name__ == "__main__":
    main()
