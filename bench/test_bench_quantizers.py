"""Benchmarks of TurboQuantMSE and TurboQuantProd beside a plain-numpy reference.

Two ways to run them (both measure the reference and turboquant in the same process):

    python -m pytest bench --benchmark-only    # pytest-benchmark tables, ratio lines, markdown table
    python bench/test_bench_quantizers.py      # the markdown table only (see --help)

Inputs are float32 standard normal vectors (n per dimension in ``N_FOR_DIM``);
every call uses turboquant's default thread count (``n_threads=None``).
The reference is ``bench/reference.py``.
"""

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc

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
from reference import (  # noqa: E402
    NumpyReferenceMSE,
    NumpyReferenceProd,
    Results,
    environment_lines,
    format_table,
    load_average,
    source_digest,
)

DIMS = (128, 1536)
BITS = (2, 3, 4)
ROTATIONS = ("dense", "hadamard")
IMPLEMENTATIONS = ("reference",) + ROTATIONS
N_QUERIES = 32
ROUNDS = 3
SEED = 0
#: seconds of sleep before timing another implementation: numpy's OpenBLAS workers spin
#: for ~0.1 s after a BLAS call and would otherwise steal the cores of the next case's
#: OpenMP team (a turboquant call's *own* BLAS-then-OpenMP sequence is still measured).
SETTLE_SECONDS = 0.25
#: vectors per dimension; d = 1536 uses fewer so the whole run stays under ~10 minutes
#: (rates are per vector, so ratios do not depend on n). TURBOQUANT_BENCH_N overrides both.
N_FOR_DIM = {128: 65536, 1536: 16384}
if os.environ.get("TURBOQUANT_BENCH_N"):
    N_FOR_DIM = {d: int(os.environ["TURBOQUANT_BENCH_N"]) for d in DIMS}

SCRIPT_COMMAND = "python bench/test_bench_quantizers.py"


def run_notes(rounds):
    return [
        "n (vectors quantized, or codes scored) per d: "
        + ", ".join(f"d={d}: {n}" for d, n in N_FOR_DIM.items())
        + " (set TURBOQUANT_BENCH_N to change it);",
        f"float32 inputs, {N_QUERIES} queries for the block case, {rounds} timed rounds after "
        "1 warm-up, one call per round; turboquant's dequantize asked for float32; "
        f"{SETTLE_SECONDS} s of sleep before each case (so idle-spinning OpenBLAS workers "
        "left by the previous case do not slow the next one).",
    ]


# ---------------------------------------------------------------------------
# Workloads, built once per process and shared by the benchmarks
# ---------------------------------------------------------------------------

_CACHE = {}


def _cached(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def vectors(d):
    """(n, d) float32 standard normal rows."""
    return _cached(("x", d), lambda: np.random.default_rng([SEED, d]).standard_normal(
        (N_FOR_DIM[d], d), dtype=np.float32))


def queries(d):
    """(N_QUERIES, d) float32 queries (the first is the single-query case)."""
    return _cached(("q", d), lambda: np.random.default_rng([SEED, d, 1]).standard_normal(
        (N_QUERIES, d), dtype=np.float32))


def quantizer(kind, d, b, impl):
    """The turboquant quantizer (impl = its rotation) or the numpy reference."""
    def build():
        if impl == "reference":
            if kind == "mse":
                return NumpyReferenceMSE(tq.lloyd_max_codebook(d, b), d, SEED)
            return NumpyReferenceProd(tq.lloyd_max_codebook(d, b - 1), d, SEED)
        if kind == "mse":
            return tq.TurboQuantMSE(d, b, seed=SEED, rotation=impl)
        sketch = "gaussian" if impl == "dense" else "hadamard"
        return tq.TurboQuantProd(d, b, seed=SEED, rotation=impl, sketch=sketch)
    return _cached(("quantizer", kind, d, b, impl), build)


def codes(kind, d, b, impl):
    """Codes of ``vectors(d)`` (computed once; the quantize benchmark stores its own)."""
    return _cached(("codes", kind, d, b, impl),
                   lambda: quantizer(kind, d, b, impl).quantize(vectors(d)))


# ---------------------------------------------------------------------------
# The operations: (name, kind) -> builder of (function, work items per call)
# ---------------------------------------------------------------------------

def _quantize(kind, d, b, impl):
    q, x = quantizer(kind, d, b, impl), vectors(d)
    return (lambda: q.quantize(x)), x.shape[0]


def _dequantize(kind, d, b, impl):
    q, c = quantizer(kind, d, b, impl), codes(kind, d, b, impl)
    if impl == "reference":
        return (lambda: q.dequantize(c)), N_FOR_DIM[d]
    return (lambda: q.dequantize(c, dtype=np.float32)), N_FOR_DIM[d]


def _inner_products_one(kind, d, b, impl):
    q, c, query = quantizer(kind, d, b, impl), codes(kind, d, b, impl), queries(d)[0]
    return (lambda: q.inner_products(c, query)), N_FOR_DIM[d]


def _inner_products_block(kind, d, b, impl):
    q, c, block = quantizer(kind, d, b, impl), codes(kind, d, b, impl), queries(d)
    return (lambda: q.inner_products(c, block)), N_FOR_DIM[d] * N_QUERIES


OPERATIONS = {
    "MSE quantize": ("mse", _quantize),
    "MSE dequantize": ("mse", _dequantize),
    "MSE inner_products, 1 query": ("mse", _inner_products_one),
    f"MSE inner_products, {N_QUERIES} queries": ("mse", _inner_products_block),
    "Prod quantize": ("prod", _quantize),
    "Prod inner_products, 1 query": ("prod", _inner_products_one),
    f"Prod inner_products, {N_QUERIES} queries": ("prod", _inner_products_block),
}


def traced_call(function):
    """``(result, peak bytes)`` of one call, the peak as seen by tracemalloc (numpy reports to it)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def check_distortion(x, reconstructed, expected):
    """Mean ``||x - x_hat||^2 / ||x||^2`` must match the codebook's distortion within
    6 standard errors (x is isotropic, so its direction is uniform whatever the rotation)."""
    x64 = x.astype(np.float64)
    errors = ((x64 - reconstructed) ** 2).sum(axis=1) / (x64 ** 2).sum(axis=1)
    mean, stderr = errors.mean(), errors.std(ddof=1) / np.sqrt(errors.size)
    assert abs(mean - expected) <= 6 * stderr + 1e-6, (
        f"relative distortion {mean:.6g} +- {stderr:.2g}; the codebook says {expected:.6g}")


def prepare(operation, d, b, impl):
    """``(function, items, peak bytes)``, after one traced call that also checks the result."""
    kind, builder = OPERATIONS[operation]
    function, items = builder(kind, d, b, impl)
    result, peak = traced_call(function)
    if operation.endswith("quantize") and not operation.endswith("dequantize"):
        _CACHE[("codes", kind, d, b, impl)] = result
    elif operation == "MSE dequantize":
        check_distortion(vectors(d), result, tq.lloyd_max_codebook(d, b).distortion)
    del result
    return function, items, peak


# ---------------------------------------------------------------------------
# pytest-benchmark mode
# ---------------------------------------------------------------------------

CASES = [(operation, d, b, impl)
         for operation in OPERATIONS for d in DIMS for b in BITS for impl in IMPLEMENTATIONS]


@pytest.mark.parametrize(
    "operation, d, b, impl", CASES,
    ids=[f"{op.replace(' ', '_').replace(',', '')}-d{d}-b{b}-{impl}" for op, d, b, impl in CASES])
def test_bench(benchmark, bench_results, operation, d, b, impl):
    function, items, peak = prepare(operation, d, b, impl)
    benchmark.group = f"{operation}, d={d}, b={b}, n={N_FOR_DIM[d]}"
    benchmark.extra_info.update(items=items, n=N_FOR_DIM[d], peak_bytes=peak)
    time.sleep(SETTLE_SECONDS)
    benchmark.pedantic(function, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        bench_results.notes = run_notes(ROUNDS)
        stats = benchmark.stats.stats
        bench_results.add(operation, d, b, impl, n=N_FOR_DIM[d], items=items,
                          seconds=stats.median, best=stats.min, peak_bytes=peak)


# ---------------------------------------------------------------------------
# Script mode
# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Environment: TURBOQUANT_BENCH_N sets n for every d; OMP_NUM_THREADS and "
               "OPENBLAS_NUM_THREADS (set before the run) pin turboquant's and numpy's threads.")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds per case")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS), choices=DIMS)
    parser.add_argument("--bits", type=int, nargs="+", default=list(BITS), choices=BITS)
    parser.add_argument("--only", default="",
                        help="run only operations whose name contains this text, e.g. 'MSE quantize'")
    args = parser.parse_args(argv)
    load_at_start, sources = load_average(), source_digest()
    results = Results()
    for operation in OPERATIONS:
        if args.only not in operation:
            continue
        for d in args.dims:
            for b in args.bits:
                _time_interleaved(results, operation, d, b, args.rounds)
    words = [f"{name}={os.environ[name]}" for name in
             ("TURBOQUANT_BENCH_N", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if name in os.environ]
    words.append(SCRIPT_COMMAND)
    words.extend(sys.argv[1:] if argv is None else argv)
    print(format_table(results, command=" ".join(words),
                       environment=environment_lines(load_at_start, sources) + run_notes(args.rounds)
                       + results.notes
                       + ["script mode interleaves the rounds of the reference and of both "
                          "rotations (so all three see the same machine load) and sleeps "
                          f"{SETTLE_SECONDS} s before every round."]))


#: Timed beside "MSE quantize": the float32 product ``x @ R.T`` alone, which both
#: sides of a dense-rotation quantize contain (reference time / its time bounds
#: the dense ratio).
GEMM = "x @ R.T alone"


def _time_interleaved(results, operation, d, b, rounds):
    """Time the reference and both rotations of one case, one round of each in turn
    (for "MSE quantize" also the reference's rotation product alone, reported as a
    note)."""
    functions = {impl: prepare(operation, d, b, impl) for impl in IMPLEMENTATIONS}
    if operation == "MSE quantize":
        x, rotation = vectors(d), quantizer("mse", d, b, "reference").rotation
        functions[GEMM] = ((lambda: x @ rotation.T), x.shape[0], 0)
    timings = {impl: [] for impl in functions}
    for function, _, _ in functions.values():
        function()  # warm-up round
    names = list(functions)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for impl in names[shift:] + names[:shift]:
            function = functions[impl][0]
            time.sleep(SETTLE_SECONDS)
            start = time.perf_counter()
            function()
            timings[impl].append(time.perf_counter() - start)
    for impl in IMPLEMENTATIONS:
        _, items, peak = functions[impl]
        results.add_timings(operation, d, b, impl, n=N_FOR_DIM[d], items=items,
                            timings=timings[impl], peak_bytes=peak)
    if GEMM in timings:
        gemm, reference = statistics.median(timings[GEMM]), statistics.median(timings["reference"])
        results.notes.append(
            f"d={d} b={b}: {GEMM} (float32, n={N_FOR_DIM[d]}) {gemm * 1e3:.1f} ms median; "
            f"reference quantize / that = {reference / gemm:.2f}x, the most a dense-rotation "
            "quantize can reach;")
    print(f"{operation} d={d} b={b}: " + ", ".join(
        f"{impl} {min(t) * 1e3:.2f} ms min" for impl, t in timings.items()),
        file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
