"""Speed of a decode step of a layer: ``MultiHeadKVCache.step`` against push then attention.

    python bench/step_speed.py                # markdown table
    python bench/step_speed.py --rounds 50 --threads 1

Per case, two caches of every configuration hold the same ``n`` random tokens
(float32 standard normal keys with an offset of 0.5, values); one decode step
is timed on each: the baseline ``push_token_all(keys, values)`` then
``attention_output_all(queries)`` (one query per query head, grouped-query
attention) on one cache, ``step(keys, values, queries)`` on the other, with the
same token and queries, so both caches stay equal. The configurations are
``KVCacheConfig(dim)`` (4-bit MSE keys and values) and the presets
``"balanced"`` and ``"compact"``. Rounds are interleaved (baseline and step
alternate, in both orders) so they see the same machine load; the table gives
the minimum over the rounds and ``baseline / step`` (the target is >= 3 at
8 KV heads, 32 query heads, dim 128, n 4096).

A second table does the same for a batch of rows of different lengths:
``BatchedMultiHeadKVCache.step`` against every row's push then attention.
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

CONFIGS = ("4-bit MSE", "balanced", "compact")
#: (label, KV heads, query heads, dim, n)
CASES = (
    ("GQA 8/32 heads", 8, 32, 128, 4096),
    ("GQA 8/32 heads", 8, 32, 128, 512),
    ("GQA 3/9 heads (SmolLM2)", 3, 9, 64, 1024),
)

#: (label, rows, KV heads, query heads, dim, lengths of the rows)
BATCH_CASES = (
    ("batch of 4, ragged", 4, 8, 32, 128, (4096, 3000, 2048, 1024)),
    ("batch of 8, ragged", 8, 3, 9, 64, (1024, 900, 800, 700, 600, 500, 400, 300)),
)


def make_config(name, dim):
    return tq.KVCacheConfig(dim) if name == "4-bit MSE" else tq.KVCacheConfig.preset(name, dim)


def make_steppers(config, heads, query_heads, n, n_threads, rng_seed=0):
    """``(baseline, step)``: zero-argument functions each doing one decode step
    on its own cache (both caches filled alike, given the same tokens)."""
    rng = np.random.default_rng(rng_seed)
    dim = config.dim
    keys = rng.standard_normal((heads, n, dim), dtype=np.float32) + 0.5
    values = rng.standard_normal((heads, n, dim), dtype=np.float32)
    caches = []
    for _ in range(2):
        cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(heads, config, num_query_heads=query_heads))
        cache.append_all(keys, values)
        caches.append(cache)
    token_keys = rng.standard_normal((heads, dim), dtype=np.float32) + 0.5
    token_values = rng.standard_normal((heads, dim), dtype=np.float32)
    queries = rng.standard_normal((query_heads, dim), dtype=np.float32)

    def baseline():
        caches[0].push_token_all(token_keys, token_values, n_threads=n_threads)
        return caches[0].attention_output_all(queries, n_threads=n_threads)

    def step():
        return caches[1].step(token_keys, token_values, queries, n_threads=n_threads)

    return baseline, step


def make_batch_steppers(config, heads, query_heads, lengths, n_threads, rng_seed=0):
    """``(baseline, step)`` for a batch: every row's push then attention, and
    ``BatchedMultiHeadKVCache.step`` (the rows filled alike, ``lengths`` tokens)."""
    rng = np.random.default_rng(rng_seed)
    dim, batch, n = config.dim, len(lengths), max(lengths)
    keys = rng.standard_normal((batch, heads, n, dim), dtype=np.float32) + 0.5
    values = rng.standard_normal((batch, heads, n, dim), dtype=np.float32)
    layer = tq.MultiHeadConfig(heads, config, num_query_heads=query_heads)
    rows = [tq.MultiHeadKVCache(layer) for _ in lengths]
    for row, k, v, count in zip(rows, keys, values, lengths):
        row.append_all(k[:, :count], v[:, :count])
    batched = tq.BatchedMultiHeadKVCache(layer, batch)
    batched.append_all(keys, values, lengths=lengths)
    token_keys = rng.standard_normal((batch, heads, dim), dtype=np.float32) + 0.5
    token_values = rng.standard_normal((batch, heads, dim), dtype=np.float32)
    queries = rng.standard_normal((batch, query_heads, dim), dtype=np.float32)

    def baseline():
        out = []
        for row, k, v, q in zip(rows, token_keys, token_values, queries):
            row.push_token_all(k, v, n_threads=n_threads)
            out.append(row.attention_output_all(q, n_threads=n_threads))
        return np.stack(out)

    def step():
        return batched.step(token_keys, token_values, queries, n_threads=n_threads)

    return baseline, step


def time_case(case, rounds, n_threads, batch=False):
    """``{(config name, "baseline" or "step"): fastest seconds}``, rounds interleaved."""
    if batch:
        _, _, heads, query_heads, dim, lengths = case
        steppers = {name: make_batch_steppers(make_config(name, dim), heads, query_heads, lengths, n_threads)
                    for name in CONFIGS}
    else:
        _, heads, query_heads, dim, n = case
        steppers = {name: make_steppers(make_config(name, dim), heads, query_heads, n, n_threads)
                    for name in CONFIGS}
    for baseline, step in steppers.values():
        np.testing.assert_array_equal(baseline(), step())     # the two agree
    return interleaved_minima({(name, kind): run for name, pair in steppers.items()
                               for kind, run in zip(("baseline", "step"), pair)}, rounds)


def table(results, batch_results, command, load_at_start):
    lines = [f"Command: `{command}`", ""]
    lines += [f"- {line}" for line in environment_lines(load_at_start, source_digest())]
    lines += ["", "| case | dim | n | config | push + attention us | step us | baseline / step |",
              "|---|---:|---:|---|---:|---:|---:|"]
    for (label, _, _, dim, n), timings in results:
        lines += rows_of(f"{label} | {dim} | {n}", timings)
    lines += ["", "| batch | dim | lengths | config | every row's push + attention us | batched step us | "
              "baseline / step |", "|---|---:|---|---|---:|---:|---:|"]
    for (label, _, _, _, dim, lengths), timings in batch_results:
        lines += rows_of(f"{label} | {dim} | {'/'.join(map(str, lengths))}", timings)
    return "\n".join(lines)


def rows_of(prefix, timings):
    lines = []
    for name in CONFIGS:
        base, step = timings[name, "baseline"], timings[name, "step"]
        lines.append(f"| {prefix} | {name} | {base * 1e6:.0f} | {step * 1e6:.0f} | {base / step:.2f} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per configuration (default 30)")
    parser.add_argument("--threads", type=int, default=None, help="n_threads of every call (default: OpenMP's)")
    args = parser.parse_args(argv)
    load_at_start = load_average()
    results, batch_results = [], []
    for batch, cases, out in ((False, CASES, results), (True, BATCH_CASES, batch_results)):
        for case in cases:
            timings = time_case(case, args.rounds, args.threads, batch)
            out.append((case, timings))
            print(f"{case[0]} d={case[-2]}: " + ", ".join(
                f"{name} {timings[name, 'baseline'] * 1e6:.0f} -> {timings[name, 'step'] * 1e6:.0f} us"
                for name in CONFIGS), file=sys.stderr, flush=True)
    print(table(results, batch_results, command_line("step_speed.py", argv), load_at_start))


if __name__ == "__main__":
    main()
