"""Benchmarks of the quantized KV cache beside a plain-numpy cache done the reference design's way.

Two ways to run them (both measure the reference and turboquant in the same process):

    python -m pytest bench/test_bench_kv_cache.py --benchmark-only   # pytest-benchmark tables + ratios
    python bench/test_bench_kv_cache.py                              # markdown table only (see --help)

Workload: head dimension 128, 4-bit MSE keys and 4-bit values (``KVCacheConfig(128)``
defaults), float32 standard normal keys, values and queries. The reference
(``bench/kv_reference.py``) uses the cache's own rotations and codebooks, stores
one uint8 per index, and dequantizes every key (scores) and every value
(attention output) on each call, like ``kv_cache.rs``. Operations:

* ``attention_output``/``attention_scores``, one query, over ``n`` cached tokens;
* ``append``: one block of 4,096 tokens into a cache already holding ``n``
  (a fresh pre-filled cache per round, built outside the timing);
* GQA decode step: ``MultiHeadKVCache`` with 8 KV heads and 32 query heads holding
  4,096 tokens: append one token to every KV head, then the attention output of
  every query head (the reference loops over the 32 query heads).

Ratios are ``reference_time / turboquant_time`` of the *minimum* over the timed
rounds (the machine is shared; the minimum is the least disturbed estimate),
with the ratio of medians beside it. The script mode interleaves the rounds of
the two implementations so both see the same machine load.

On a busy machine, time both sides on one core too, which is far more stable
(libgomp's spinning workers and OpenBLAS's compete for the CPUs other jobs hold):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/test_bench_kv_cache.py
"""

import argparse
import gc
import io
import os
import platform
import statistics
import sys
import time
import tracemalloc
import zlib

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when OpenMP loads (README, threads)

import numpy as np
import pytest

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
# Script mode: prefer an in-place build of the checkout over an installed package.
if any(name.startswith("_core.") for name in os.listdir(os.path.join(ROOT, "turboquant", "_kernels"))):
    sys.path.insert(1, ROOT)

import turboquant as tq  # noqa: E402
from kv_reference import NumpyKVCacheReference, NumpyMultiHeadReference  # noqa: E402
from reference import blas_core, cpu_model, load_average  # noqa: E402

DIM = 128
BITS = 4
NS = (4096, 32768)
BLOCK = 4096
KV_HEADS, QUERY_HEADS, GQA_TOKENS = 8, 32, 4096
#: Timed rounds: enough to spend about ROUND_BUDGET seconds per case, at least MIN_ROUNDS and at most
#: MAX_ROUNDS (fast calls get many rounds, so their minimum is likely to be an undisturbed one).
MIN_ROUNDS, MAX_ROUNDS, ROUND_BUDGET = 15, 300, 1.0
SEED = 0
#: n_threads of every turboquant call (None: the OpenMP default); the script's --threads sets it.
N_THREADS = None
IMPLEMENTATIONS = ("reference", "turboquant")

OUTPUT = "attention_output, 1 query"
SCORES = "attention_scores, 1 query"
APPEND = f"append {BLOCK}-token block"
GQA = f"GQA decode step ({KV_HEADS} KV / {QUERY_HEADS} query heads)"

#: reference_time / turboquant_time asked for, by operation.
TARGETS = {OUTPUT: 50.0, SCORES: 20.0, APPEND: 3.0}
#: what "tokens/s" counts, by operation.
UNITS = {OUTPUT: "cached tokens read", SCORES: "cached tokens read", APPEND: "tokens appended",
         GQA: "decode steps (generated tokens, one layer)"}

PYTEST_COMMAND = "python -m pytest bench/test_bench_kv_cache.py --benchmark-only"
SCRIPT_COMMAND = "python bench/test_bench_kv_cache.py"


# ---------------------------------------------------------------------------
# Data and filled caches, built once per process
# ---------------------------------------------------------------------------

_CACHE = {}


def _cached(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def rows(name, shape):
    """Float32 standard normal array, seeded by its name and shape."""
    return _cached(("rows", name, shape), lambda: np.random.default_rng(
        [SEED, zlib.crc32(name.encode()), *shape]).standard_normal(shape, dtype=np.float32))


def head_config():
    return tq.KVCacheConfig(DIM, key_bits=BITS, value_bits=BITS)


def filled_cache(n):
    """A turboquant cache holding ``n`` tokens (do not mutate: shared by the read benchmarks)."""
    def build():
        cache = tq.QuantizedKVCache(head_config())
        cache.append(rows("keys", (n, DIM)), rows("values", (n, DIM)))
        return cache
    return _cached(("tq", n), build)


def filled_reference(n):
    """The reference with the parameters of :func:`filled_cache` holding the same ``n`` tokens."""
    def build():
        reference = NumpyKVCacheReference.like(filled_cache(n))
        reference.append(rows("keys", (n, DIM)), rows("values", (n, DIM)))
        return reference
    return _cached(("ref", n), build)


def multi_head_config():
    return tq.MultiHeadConfig(KV_HEADS, head_config(), num_query_heads=QUERY_HEADS)


# ---------------------------------------------------------------------------
# Workloads: (function, setup, items per call, bytes per cached token)
# ---------------------------------------------------------------------------

def rounds_for(seconds_per_call):
    """Rounds that spend about ROUND_BUDGET seconds, clamped to [MIN_ROUNDS, MAX_ROUNDS]."""
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, ROUND_BUDGET / max(seconds_per_call, 1e-9))))


class Work:
    """One timed operation. ``setup()`` returns the positional arguments of ``function``
    (built outside the timing), ``items`` is what tokens/s counts per call."""

    def __init__(self, function, items, bytes_per_token, setup=None):
        self.function, self.items, self.bytes_per_token = function, items, bytes_per_token
        self.setup = setup or (lambda: ())

    def timed(self):
        """Seconds of one call (its setup untimed)."""
        args = self.setup()
        start = time.perf_counter()
        self.function(*args)
        return time.perf_counter() - start


def _bytes_per_token(cache):
    return cache.stats().total_bytes / cache.num_tokens


def _read_work(operation, n, impl):
    cache = filled_reference(n) if impl == "reference" else filled_cache(n)
    query = rows("query", (DIM,))
    method = cache.attention_output if operation == OUTPUT else cache.attention_scores
    if impl == "reference":
        return Work(lambda: method(query), n, cache.nbytes / n)
    return Work(lambda: method(query, n_threads=N_THREADS), n, _bytes_per_token(cache))


def _append_work(operation, n, impl):
    keys, values = rows("keys", (n, DIM)), rows("values", (n, DIM))
    block_k, block_v = rows("block keys", (BLOCK, DIM)), rows("block values", (BLOCK, DIM))
    template = filled_cache(n)  # only its parameters (rotations, codebooks) are used

    def setup():
        if impl == "reference":
            cache = NumpyKVCacheReference.like(template)
        else:
            cache = tq.QuantizedKVCache(head_config())
        cache.append(keys, values)  # the pre-fill, untimed
        gc.collect()
        return (cache,)

    def append(cache):
        if impl == "reference":
            cache.append(block_k, block_v)
        else:
            cache.append(block_k, block_v, n_threads=N_THREADS)
        return cache

    probe = append(*setup())
    per_token = (probe.nbytes / probe.num_tokens if impl == "reference" else _bytes_per_token(probe))
    return Work(append, BLOCK, per_token, setup)


def _filled_multi_head():
    def build():
        cache = tq.MultiHeadKVCache(multi_head_config())
        cache.append_all(rows("gqa keys", (KV_HEADS, GQA_TOKENS, DIM)),
                         rows("gqa values", (KV_HEADS, GQA_TOKENS, DIM)))
        return cache
    return _cached(("tq gqa",), build)


def _filled_multi_head_reference():
    def build():
        reference = NumpyMultiHeadReference(_filled_multi_head())
        reference.append_all(rows("gqa keys", (KV_HEADS, GQA_TOKENS, DIM)),
                             rows("gqa values", (KV_HEADS, GQA_TOKENS, DIM)))
        return reference
    return _cached(("ref gqa",), build)


def _gqa_work(operation, n, impl):
    # Every round appends one token (as a decode step does): n grows by at most MAX_ROUNDS + 1 (2.5%).
    key, value = rows("step key", (KV_HEADS, DIM)), rows("step value", (KV_HEADS, DIM))
    queries = rows("step queries", (QUERY_HEADS, DIM))
    if impl == "reference":
        reference = _filled_multi_head_reference()
        return Work(lambda: reference.decode_step(key, value, queries), 1,
                    reference.nbytes / reference.heads[0].num_tokens)
    cache = _filled_multi_head()

    def step():
        cache.push_token_all(key, value, n_threads=N_THREADS)
        return cache.attention_output_all(queries, n_threads=N_THREADS)
    return Work(step, 1, cache.stats().total_bytes / cache.num_tokens)


OPERATIONS = {OUTPUT: (NS, _read_work), SCORES: (NS, _read_work), APPEND: (NS, _append_work),
              GQA: ((GQA_TOKENS,), _gqa_work)}
CASES = [(operation, n, impl) for operation, (ns, _) in OPERATIONS.items()
         for n in ns for impl in IMPLEMENTATIONS]


def make_work(operation, n, impl):
    return OPERATIONS[operation][1](operation, n, impl)


# ---------------------------------------------------------------------------
# Checks: the two sides compute the same thing (same codes, same maths)
# ---------------------------------------------------------------------------

def check_agreement(operation, n):
    """turboquant and the reference agree (codes differ only where float32 rounding
    puts a coordinate on the other side of a boundary)."""
    if operation == GQA:
        cache, reference = _filled_multi_head(), _filled_multi_head_reference()
        queries = rows("step queries", (QUERY_HEADS, DIM))
        ours, theirs = cache.attention_output_all(queries), reference.attention_output_all(queries)
    elif operation == APPEND:
        return
    else:
        query = rows("query", (DIM,))
        cache, reference = filled_cache(n), filled_reference(n)
        if operation == SCORES:
            ours, theirs = cache.attention_scores(query), reference.attention_scores(query)
            off = np.abs(ours - theirs) > 1e-3 * np.abs(theirs).max()
            assert off.mean() < 1e-3, f"{off.sum()} of {n} scores differ from the reference"
            return
        ours, theirs = cache.attention_output(query), reference.attention_output(query)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-3 * scale, "attention outputs differ from the reference"


def traced_peak(work):
    """Peak bytes numpy allocated during one call (tracemalloc; the kernels' own C scratch is not seen)."""
    args = work.setup()
    gc.collect()
    tracemalloc.start()
    try:
        work.function(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


# ---------------------------------------------------------------------------
# Results and the table
# ---------------------------------------------------------------------------

class KVResults:
    """Timings (seconds) keyed by ``(operation, n, impl)``."""

    def __init__(self):
        self.entries = {}

    def add(self, operation, n, impl, *, timings, items, bytes_per_token, peak_bytes):
        self.entries[operation, n, impl] = {
            "min": min(timings), "median": statistics.median(timings), "rounds": len(timings),
            "items": items, "bytes_per_token": bytes_per_token, "peak": peak_bytes}

    def rows(self):
        out = []
        for (operation, n, impl), ours in self.entries.items():
            ref = self.entries.get((operation, n, "reference"))
            if impl == "reference" or ref is None:
                continue
            ratio = ref["min"] / ours["min"]
            target = TARGETS.get(operation)
            out.append({
                "operation": operation, "n": n, "ref": ref, "ours": ours, "ratio": ratio,
                "median_ratio": ref["median"] / ours["median"], "target": target,
                "met": None if target is None else ratio >= target})
        return out

    def ratio_lines(self):
        lines = []
        for row in self.rows():
            mark = "" if row["target"] is None else " (target >= {:g}x: {})".format(
                row["target"], "met" if row["met"] else "NOT met")
            lines.append(f"{row['operation']} n={row['n']}: reference_time / turboquant_time = "
                         f"{row['ratio']:.1f}x by min, {row['median_ratio']:.1f}x by median{mark}")
        return lines


def _ms(seconds):
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def _rate(value):
    if value >= 1e6:
        return f"{value / 1e6:.1f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


LOAD_AT_START = load_average()


def environment(load_at_start):
    """Versions, threads, CPU and BLAS (from ``reference.py``), machine load."""
    config = tq.show_config(file=io.StringIO())
    lines = [f"turboquant {config['version']} (OpenMP {'on' if config['openmp'] else 'off'}, "
             f"default n_threads {tq.resolve_n_threads()}), numpy {np.__version__}, "
             f"Python {platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
             f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')};"]
    library, kernel = blas_core()
    lines += [f"CPU: {cpu_model()};", f"numpy BLAS: {library}; kernel: {kernel};"]
    end = load_average()
    if end is not None:
        lines.append(f"1-minute load average {load_at_start:.2f} at start, {end:.2f} at end "
                     f"(on {os.cpu_count()} CPUs; anything above 0 is other work competing with the benchmark);")
    return lines


def run_notes(rounds, n_threads):
    threads = "default" if n_threads is None else n_threads
    if rounds:
        rounds = f"{rounds} timed rounds"
    else:
        rounds = (f"{MIN_ROUNDS}-{MAX_ROUNDS} timed rounds (about {ROUND_BUDGET} s per case; "
                  "`rounds` column: reference / turboquant)")
    return [
        f"dim {DIM}, {BITS}-bit MSE keys and {BITS}-bit values (`KVCacheConfig({DIM})`), float32 "
        f"standard normal data; turboquant n_threads={threads}; {rounds} after 1 warm-up;",
        "times are the minimum over the rounds; `ratio` = reference_time / turboquant_time of the "
        "minima, `median ratio` the same with medians (the machine is shared);",
        "tokens/s (turboquant): " + "; ".join(f"{op.split(',')[0].split(' (')[0]}: {unit}"
                                               for op, unit in UNITS.items()) + ";",
        "bytes/token from `stats()` (turboquant, all KV heads for GQA) / the reference's uint8 indices "
        "and float32 norms; peak KB: numpy allocations of one call (tracemalloc).",
    ]


def format_table(results, *, command, notes, load_at_start=LOAD_AT_START):
    lines = [f"Command: `{command}`", "", *(f"- {line}" for line in environment(load_at_start) + notes), "",
             "| operation | n | reference ms | turboquant ms | ratio | median ratio | target "
             "| tokens/s | bytes/token tq / ref | peak KB ref / tq | rounds |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for row in results.rows():
        ref, ours = row["ref"], row["ours"]
        target = "" if row["target"] is None else "≥ {:g}× {}".format(
            row["target"], "met" if row["met"] else "**not met**")
        lines.append(
            f"| {row['operation']} | {row['n']} | {_ms(ref['min'])} | {_ms(ours['min'])} "
            f"| {row['ratio']:.1f}× | {row['median_ratio']:.1f}× | {target} "
            f"| {_rate(ours['items'] / ours['min'])} "
            f"| {ours['bytes_per_token']:.0f} / {ref['bytes_per_token']:.0f} "
            f"| {ref['peak'] / 1024:.0f} / {ours['peak'] / 1024:.0f} | {ref['rounds']} / {ours['rounds']} |")
    return "\n".join(lines)


RESULTS = KVResults()


# ---------------------------------------------------------------------------
# pytest-benchmark mode
# ---------------------------------------------------------------------------

class _Summary:
    """Registered as a pytest plugin by the first benchmark of this file: prints the
    ratios and the table after pytest-benchmark's own report."""

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter):
        if not RESULTS.rows():
            return
        terminalreporter.section("turboquant KV cache vs numpy reference")
        for line in RESULTS.ratio_lines():
            terminalreporter.write_line(line)
        terminalreporter.write_line("")
        terminalreporter.write_line(format_table(RESULTS, command=PYTEST_COMMAND,
                                                 notes=run_notes(None, None)))


@pytest.fixture(scope="module", autouse=True)
def _kv_summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("turboquant-kv-summary"):
        manager.register(_Summary(), "turboquant-kv-summary")


@pytest.mark.parametrize(
    "operation, n, impl", CASES,
    ids=[f"{op.split(' (')[0].replace(' ', '_').replace(',', '')}-n{n}-{impl}" for op, n, impl in CASES])
def test_bench_kv(benchmark, operation, n, impl):
    if impl == "reference":
        check_agreement(operation, n)
    work = make_work(operation, n, impl)
    peak = traced_peak(work)
    benchmark.group = f"{operation}, n={n}"
    benchmark.extra_info.update(items=work.items, bytes_per_token=work.bytes_per_token, peak_bytes=peak)
    rounds = rounds_for(work.timed())  # the warm-up round
    benchmark.pedantic(work.function, setup=lambda: (work.setup(), {}), rounds=rounds,
                       warmup_rounds=0, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        RESULTS.add(operation, n, impl, timings=benchmark.stats.stats.data, items=work.items,
                    bytes_per_token=work.bytes_per_token, peak_bytes=peak)


# ---------------------------------------------------------------------------
# Script mode: interleaved rounds, markdown table
# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds per implementation (default: {MIN_ROUNDS}-{MAX_ROUNDS}, "
                             f"about {ROUND_BUDGET} s per case)")
    parser.add_argument("--only", default="", help="run only operations whose name contains this text")
    parser.add_argument("--threads", type=int, default=None,
                        help="turboquant n_threads (default: OpenMP default)")
    args = parser.parse_args(argv)
    load_at_start = load_average()
    global N_THREADS
    N_THREADS = args.threads
    results = KVResults()
    for operation, (ns, _) in OPERATIONS.items():
        if args.only not in operation:
            continue
        for n in ns:
            check_agreement(operation, n)
            works = {impl: make_work(operation, n, impl) for impl in IMPLEMENTATIONS}
            peaks = {impl: traced_peak(work) for impl, work in works.items()}
            timings = {impl: [] for impl in IMPLEMENTATIONS}
            warm = sum(work.timed() for work in works.values())  # warm-up
            for r in range(args.rounds or rounds_for(warm)):
                # Alternate which side goes first so both see the same machine load.
                for impl in (IMPLEMENTATIONS if r % 2 == 0 else IMPLEMENTATIONS[::-1]):
                    timings[impl].append(works[impl].timed())
            for impl, work in works.items():
                results.add(operation, n, impl, timings=timings[impl], items=work.items,
                            bytes_per_token=work.bytes_per_token, peak_bytes=peaks[impl])
            print(f"{operation} n={n}: reference {min(timings['reference']) * 1e3:.3f} ms, "
                  f"turboquant {min(timings['turboquant']) * 1e3:.3f} ms (minima)",
                  file=sys.stderr, flush=True)
    command = SCRIPT_COMMAND + ("" if argv is None and len(sys.argv) == 1
                                else " " + " ".join(sys.argv[1:] if argv is None else argv))
    for line in results.ratio_lines():
        print(line, file=sys.stderr)
    print(format_table(results, command=command, notes=run_notes(args.rounds, args.threads),
                       load_at_start=load_at_start))


if __name__ == "__main__":
    main()
