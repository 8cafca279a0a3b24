"""Nearest-neighbour search with ``TurboQuantIndex`` against FAISS's quantized flat indexes.

    python bench/index_search.py                       # markdown tables (about 6 minutes on 2 idle cores)
    python bench/index_search.py --quick               # small sizes: a smoke run of a few seconds
    python bench/index_search.py --dims 128 --threads 1 --json index.json

Datasets: unit-normalised Gaussian mixtures (one cluster per 64 base vectors,
centres and noise standard normal per coordinate) at every ``--dims`` (n =
65,536 base vectors up to d = 512, 16,384 above), 1,000 queries drawn from the
same clusters (none in the base); and the MiniLM embeddings of
``../shared/data/stdlib_minilm.npz`` (5,193 base, 500 queries, skipped when the
file is absent). Ground truth is the exact inner-product top-100 (numpy,
float64, ties to the smaller index; the file's own ``gt`` for MiniLM).

Methods, all searched by inner product over the same vectors with the same
thread count: ``TurboQuantIndex(d, bits)`` at 2, 4 and 8 bits (and 4 bits with
``keep_originals=True`` re-ranking the best 40 exactly); FAISS, when it is
installed: ``IndexPQFastScan`` and ``IndexPQ`` at our code bytes (4 bits per
coordinate: M = d with 4-bit and M = d/2 with 8-bit sub-quantizers; 2 bits:
M = d/2 and M = d/4), ``IndexScalarQuantizer`` (``QT_4bit``, ``QT_8bit``) and
``IndexRaBitQ`` / ``IndexRaBitQFastScan`` (1, 2 and 4 bits) where this FAISS has
them. FAISS trains on the base itself (or a seeded sample, as the notes say).

Per method: code bytes per vector, build time (FAISS train + add, ours add; the
add is the fastest of a few rounds), queries/s for single-query calls and for
64 queries in one call (k = 10; fastest of ``--rounds`` rounds, the rounds of
all methods interleaved so they see the same machine load), recall@10 and the
TurboQuant paper's recall@1@k. A second table gives ours / FAISS at equal bits
per coordinate. No timing is asserted anywhere.
"""

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when OpenMP loads (README, threads)

import numpy as np  # noqa: E402
from reference import (command_line, environment_lines, interleaved_minima, load_average,  # noqa: E402
                       prefer_in_place_build, source_digest)

prefer_in_place_build()
from turboquant import TurboQuantIndex  # noqa: E402

SEED = 0
K = 10
BATCH = 64
#: k of the paper's recall@1@k (is the true nearest neighbour among the first k returned?).
RECALL_KS = (1, 2, 4, 8, 16, 32, 64)
GT_DEPTH = 100
POINTS_PER_CLUSTER = 64
SPREAD = 1.0  # noise / centre scale of the mixture: a cluster's members have cosine about 0.5
MINILM = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "stdlib_minilm.npz"
#: FAISS trains on at most this many base vectors (a seeded sample).
TRAIN_LIMIT = 65536
#: IndexPQ with 8-bit sub-quantizers at d >= PQ8_LARGE_D trains 2-4 dimensional k-means with 256
#: centroids d/2 times: ~10 minutes on 2 cores at d = 1536. It gets this sample and iteration count.
PQ8_LARGE_D, PQ8_LARGE_SAMPLE, PQ8_LARGE_ITERATIONS = 1024, 4096, 10
#: --quick: every FAISS product quantizer trains on this sample with this many k-means iterations.
QUICK_SAMPLE, QUICK_ITERATIONS = 1024, 5
ADD_ROUNDS = 3


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def clustered(n, m, d, seed=SEED):
    """``(base, queries)``: (n, d) and (m, d) float32 unit vectors of one Gaussian mixture."""
    rng = np.random.default_rng([seed, d, n])
    clusters = max(1, n // POINTS_PER_CLUSTER)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)

    def draw(count):
        x = centres[rng.integers(clusters, size=count)]
        x += SPREAD * rng.standard_normal((count, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return draw(n), draw(m)


def exact_top(base, queries, depth=GT_DEPTH, block=128):
    """(m, depth) int64 indices of the largest inner products, best first, ties to the smaller index."""
    depth = min(depth, base.shape[0])
    base64 = base.astype(np.float64)
    out = np.empty((queries.shape[0], depth), dtype=np.int64)
    for start in range(0, queries.shape[0], block):
        scores = queries[start:start + block].astype(np.float64) @ base64.T
        part = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        order = np.lexsort((part, -np.take_along_axis(scores, part, 1)), axis=-1)
        out[start:start + block] = np.take_along_axis(part, order, 1)
    return out


class Dataset:
    """Float32 ``base`` (n, d) and ``queries`` (m, d), ``gt`` (m, >= 64) int64 exact top ids, best first."""

    def __init__(self, name, base, queries, gt, source):
        self.name, self.base, self.queries, self.gt, self.source = name, base, queries, gt, source
        self.n, self.d = base.shape


def synthetic(d, n, m):
    base, queries = clustered(n, m, d)
    return Dataset(f"synthetic d={d}", base, queries, exact_top(base, queries),
                   f"Gaussian mixture, {max(1, n // POINTS_PER_CLUSTER)} clusters, unit-normalised, seed {SEED}")


def minilm(path, m=None):
    """The MiniLM stdlib embeddings, or None when the file is absent."""
    if not path or not pathlib.Path(path).is_file():
        return None
    with np.load(path) as data:
        base = np.ascontiguousarray(data["base"], dtype=np.float32)
        queries = np.ascontiguousarray(data["queries"], dtype=np.float32)
        gt = data["gt"].astype(np.int64)
    if m is not None:
        queries, gt = queries[:m], gt[:m]
    return Dataset(f"MiniLM stdlib d={base.shape[1]}", base, queries, gt,
                   f"{pathlib.Path(path).name}: all-MiniLM-L6-v2 docstring embeddings, file's exact top-100")


# ---------------------------------------------------------------------------
# Methods: build once, then search(queries, k) -> (m, k) ids
# ---------------------------------------------------------------------------

class Ours:
    """``TurboQuantIndex(d, bits, metric="ip")``; with ``rerank``, originals kept and that many re-ranked."""

    family = "turboquant"

    def __init__(self, bits, rerank=0):
        self.bits, self.rerank = bits, rerank
        self.name = f"ours {bits}-bit" + (f" + rerank {rerank}" if rerank else "")
        self.config = f"TurboQuantIndex(d, bits={bits}, metric='ip'" + (
            f", keep_originals=True), search(rerank={rerank})" if rerank else ")")
        self.index = None

    def build(self, base, threads, sample):
        best = np.inf
        for _ in range(ADD_ROUNDS):
            index = TurboQuantIndex(base.shape[1], bits=self.bits, metric="ip", seed=SEED,
                                    keep_originals=bool(self.rerank))
            start = time.perf_counter()
            index.add(base, n_threads=threads)
            best = min(best, time.perf_counter() - start)
            self.index = index
        self.threads = threads
        return 0.0, best

    def search(self, queries, k):
        return self.index.search(queries, k, rerank=self.rerank, n_threads=self.threads)[1]

    def code_bytes(self):
        return self.index.code_size

    def held_bytes(self):
        return self.index.nbytes / len(self.index)


@contextlib.contextmanager
def captured_stderr(lines):
    """Send what C code writes to file descriptor 2 into ``lines`` (FAISS's k-means warnings)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


class Faiss:
    """A FAISS index made by ``make()``, trained on ``train_sample`` rows of the sample (all by default),
    with ``iterations`` k-means iterations for its product quantizer (FAISS's default by default)."""

    family = "faiss"

    def __init__(self, name, config, make, bits, train_sample=None, iterations=None):
        self.name, self.config, self.make, self.bits = name, config, make, bits
        self.train_sample, self.iterations = train_sample, iterations
        self.index = None
        self.warnings = []

    def build(self, base, threads, sample):
        index = self.make()
        if self.iterations is not None:
            index.pq.cp.niter = self.iterations
        rows = base[np.sort(sample[:self.train_sample])]  # sample: a seeded permutation of row numbers
        start = time.perf_counter()
        with captured_stderr(self.warnings):
            index.train(rows)
        train = time.perf_counter() - start
        best = np.inf
        for _ in range(ADD_ROUNDS):
            index.reset()
            start = time.perf_counter()
            index.add(base)
            best = min(best, time.perf_counter() - start)
        self.index = index
        return train, best

    def search(self, queries, k):
        return self.index.search(queries, k)[1]

    def code_bytes(self):
        return self.index.sa_code_size()

    def held_bytes(self):
        try:
            return self.index.codes.size() / self.index.ntotal
        except AttributeError:
            return float(self.code_bytes())


def nearest_divisor(d, target):
    """The divisor of ``d`` closest to ``target`` (the larger on a tie)."""
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), -m))


def faiss_methods(faiss, d, bits_list, quick, notes):
    """The FAISS indexes compared with ``bits_list`` bits per coordinate at dimension ``d``."""
    ip = faiss.METRIC_INNER_PRODUCT
    methods = []

    def pq(kind, bits, sub_bits, target):
        m = nearest_divisor(d, target)
        if m != target:
            notes.append(f"d={d}: {kind} M={target} does not divide d; used M={m}")
        maker = faiss.IndexPQFastScan if kind == "IndexPQFastScan" else faiss.IndexPQ
        sample = iterations = None
        if quick:
            sample, iterations = QUICK_SAMPLE, QUICK_ITERATIONS
        elif kind == "IndexPQ" and sub_bits == 8 and d >= PQ8_LARGE_D:
            sample, iterations = PQ8_LARGE_SAMPLE, PQ8_LARGE_ITERATIONS
        config = f"{kind}(d, {m}, {sub_bits}, METRIC_INNER_PRODUCT)"
        if sample is not None:
            config += f", trained on {sample} vectors, {iterations} k-means iterations"
        label = "PQFastScan" if kind == "IndexPQFastScan" else "PQ"
        methods.append(Faiss(f"FAISS {label} M={m}x{sub_bits}", config,
                             lambda: maker(d, m, sub_bits, ip), bits, sample, iterations))

    def sq(bits):
        qtype = getattr(faiss.ScalarQuantizer, f"QT_{bits}bit")
        methods.append(Faiss(f"FAISS SQ{bits}", f"IndexScalarQuantizer(d, QT_{bits}bit, METRIC_INNER_PRODUCT)",
                             lambda: faiss.IndexScalarQuantizer(d, qtype, ip), bits))

    def rabitq(bits, fast):
        kind = "IndexRaBitQFastScan" if fast else "IndexRaBitQ"
        if not hasattr(faiss, kind):
            return
        if fast:
            make = (lambda: faiss.IndexRaBitQFastScan(d, ip, 32, bits))
            config = f"IndexRaBitQFastScan(d, METRIC_INNER_PRODUCT, bbs=32, nb_bits={bits})"
        else:
            make = (lambda: faiss.IndexRaBitQ(d, ip, bits))
            config = f"IndexRaBitQ(d, METRIC_INNER_PRODUCT, nb_bits={bits})"
        try:
            make()
        except (RuntimeError, TypeError, NotImplementedError) as error:  # a FAISS without multi-bit RaBitQ
            notes.append(f"d={d}: {config} refused ({str(error).splitlines()[0]}); skipped")
            return
        methods.append(Faiss(f"FAISS {'RaBitQFastScan' if fast else 'RaBitQ'} {bits}-bit", config, make, bits))

    for bits in bits_list:
        if bits == 4:
            pq("IndexPQFastScan", 4, 4, d)
            pq("IndexPQ", 4, 8, d // 2)
            sq(4)
            rabitq(4, fast=False)
            rabitq(4, fast=True)
        elif bits == 2:
            pq("IndexPQFastScan", 2, 4, d // 2)
            pq("IndexPQ", 2, 8, d // 4)
            rabitq(2, fast=False)
        elif bits == 8:
            sq(8)
        elif bits == 1:
            pq("IndexPQFastScan", 1, 4, d // 4)
    rabitq(1, fast=False)
    rabitq(1, fast=True)
    return methods


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def recall_at_k(ids, gt, k):
    """Mean fraction of the true top-k found among the first k returned."""
    hits = (ids[:, :k, None] == gt[:, None, :k]).any(axis=2)
    return float(hits.sum(axis=1).mean() / k)


def recall_1_at(ids, gt):
    """``{k: fraction of queries whose true nearest neighbour is among the first k returned}``."""
    return {k: float((ids[:, :k] == gt[:, :1]).any(axis=1).mean()) for k in RECALL_KS}


def measure(dataset, methods, threads, rounds, singles, log):
    """Build, check and time every method on ``dataset``; one dict per method."""
    rng = np.random.default_rng([SEED, dataset.n])
    sample = rng.permutation(dataset.n)[:TRAIN_LIMIT]
    rows = []
    for method in methods:
        train, add = method.build(dataset.base, threads, sample)
        ids10 = method.search(dataset.queries, K)
        ids64 = method.search(dataset.queries, max(RECALL_KS))
        rows.append({
            "method": method.name, "family": method.family, "bits": method.bits, "config": method.config,
            "code_bytes": int(method.code_bytes()), "held_bytes": float(method.held_bytes()),
            "train_s": train, "add_s": add, "build_vectors_per_s": dataset.n / (train + add),
            "recall_at_10": recall_at_k(ids10, dataset.gt, K), "recall_1_at": recall_1_at(ids64, dataset.gt),
            "warnings": len(getattr(method, "warnings", ())),
            "first_warning": (getattr(method, "warnings", None) or [None])[0]})
        log(f"  {method.name}: train {train:.2f} s, add {add:.3f} s, "
            f"recall@10 {rows[-1]['recall_at_10']:.3f}")
    single = [np.ascontiguousarray(dataset.queries[i:i + 1]) for i in range(min(singles, len(dataset.queries)))]
    batch = np.ascontiguousarray(dataset.queries[:BATCH])

    def one_at_a_time(method):
        return lambda: [method.search(query, K) for query in single]

    time.sleep(0.25)  # numpy's OpenBLAS workers spin a while after the ground truth's products
    best_single = interleaved_minima({m.name: one_at_a_time(m) for m in methods}, rounds)
    best_batch = interleaved_minima({m.name: (lambda m=m: m.search(batch, K)) for m in methods}, rounds)
    for row in rows:
        row["qps_1"] = len(single) / best_single[row["method"]]
        row["qps_64"] = len(batch) / best_batch[row["method"]]
    log(f"  timed {len(single)} single-query calls and one {len(batch)}-query call, {rounds} rounds")
    return rows


def equal_bits_pairs(rows):
    """(ours, faiss) rows of the same bits per coordinate (ours without re-ranking)."""
    ours = [r for r in rows if r["family"] == "turboquant" and "rerank" not in r["method"]]
    return [(o, f) for o in ours for f in rows if f["family"] == "faiss" and f["bits"] == o["bits"]]


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------

def _rate(value):
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def _seconds(value):
    return "–" if value == 0 else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def method_table(rows):
    ks = " | ".join(f"R1@{k}" for k in RECALL_KS)
    lines = [(f"| method | bits | code B | held B | train s | add s | build vec/s | 1-query q/s "
              f"| {BATCH}-query q/s | recall@10 | {ks} |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(RECALL_KS)]
    for r in rows:
        recalls = " | ".join(f"{r['recall_1_at'][k]:.3f}" for k in RECALL_KS)
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['code_bytes']} | {r['held_bytes']:.0f} | {_seconds(r['train_s'])} "
            f"| {_seconds(r['add_s'])} | {_rate(r['build_vectors_per_s'])} | {_rate(r['qps_1'])} "
            f"| {_rate(r['qps_64'])} | {r['recall_at_10']:.3f} | {recalls} |")
    return lines


def ratio_table(rows):
    lines = [("| ours | FAISS | code B ours / FAISS | 1-query q/s ours / FAISS | "
              f"{BATCH}-query q/s ours / FAISS | build vec/s ours / FAISS | recall@10 ours / FAISS "
              "| R1@1 ours / FAISS | R1@8 ours / FAISS |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for o, f in equal_bits_pairs(rows):
        lines.append(
            f"| {o['method']} | {f['method']} | {o['code_bytes']} / {f['code_bytes']} "
            f"| {o['qps_1'] / f['qps_1']:.2f}× | {o['qps_64'] / f['qps_64']:.2f}× "
            f"| {o['build_vectors_per_s'] / f['build_vectors_per_s']:.1f}× "
            f"| {o['recall_at_10']:.3f} / {f['recall_at_10']:.3f} "
            f"| {o['recall_1_at'][1]:.3f} / {f['recall_1_at'][1]:.3f} "
            f"| {o['recall_1_at'][8]:.3f} / {f['recall_1_at'][8]:.3f} |")
    return lines


# ---------------------------------------------------------------------------
# Script
# ---------------------------------------------------------------------------

def _int_list(text):
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="n_threads of turboquant and faiss.omp_set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (n=4096, 200 queries, d=128 only, short FAISS training)")
    parser.add_argument("--dims", type=_int_list, default=None,
                        help="dimensions of the synthetic sets, comma separated ('' for none; "
                             "default 128,1536; --quick: 128)")
    parser.add_argument("--bits", type=_int_list, default=[2, 4, 8],
                        help="bits per coordinate of our index (default 2,4,8)")
    parser.add_argument("--n", type=int, default=None,
                        help="base vectors of every synthetic set (default 65536 up to d=512, 16384 above; "
                             "--quick: 4096)")
    parser.add_argument("--queries", type=int, default=None,
                        help="queries per set (default 1000, MiniLM all 500; --quick: 200, MiniLM 100)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per method (default 5; --quick: 2)")
    parser.add_argument("--singles", type=int, default=None,
                        help="single-query calls per timed round (default 64; --quick: 16)")
    parser.add_argument("--rerank", type=int, default=40,
                        help="candidates re-ranked by the 'ours 4-bit + rerank' row (0: no such row)")
    parser.add_argument("--minilm", default=str(MINILM),
                        help="path of stdlib_minilm.npz ('' to skip; skipped when absent)")
    parser.add_argument("--no-faiss", action="store_true", help="leave FAISS out even when it is installed")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    dims = args.dims if args.dims is not None else [128] if args.quick else [128, 1536]
    queries = args.queries or (200 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 5)
    singles = args.singles or (16 if args.quick else 64)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    load_at_start, sources = load_average(), source_digest()
    notes = []
    faiss = None
    if not args.no_faiss:
        try:
            import faiss
        except ImportError:
            notes.append("FAISS is not installed (pip install faiss-cpu): its rows are left out")
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)

    datasets = []
    for d in dims:
        n = args.n or (4096 if args.quick else 65536 if d <= 512 else 16384)
        log(f"{time.strftime('%H:%M:%S')} synthetic d={d}: {n} base, {queries} queries, exact top-{GT_DEPTH}")
        datasets.append(synthetic(d, n, queries))
    real = minilm(args.minilm, args.queries or (100 if args.quick else None))
    if real is not None:
        datasets.append(real)
    elif args.minilm:
        notes.append(f"{args.minilm} is absent: the MiniLM set is left out")

    results = []
    for dataset in datasets:
        log(f"{time.strftime('%H:%M:%S')} {dataset.name}: n={dataset.n}, {len(dataset.queries)} queries")
        methods = [Ours(bits) for bits in args.bits]
        if args.rerank and 4 in args.bits:
            methods.append(Ours(4, rerank=args.rerank))
        if faiss is not None:
            methods += faiss_methods(faiss, dataset.d, args.bits, args.quick, notes)
        rows = measure(dataset, methods, args.threads, rounds, singles, log)
        results.append({"dataset": dataset.name, "source": dataset.source, "d": dataset.d, "n": dataset.n,
                        "queries": len(dataset.queries), "methods": rows})
    for result in results:
        for row in result["methods"]:
            if row["warnings"]:
                notes.append(f"{result['dataset']}, {row['method']}: FAISS printed {row['warnings']} line(s) "
                             f"while training, e.g. \"{row['first_warning']}\"")

    command = command_line("index_search.py", argv)
    environment = environment_lines(load_at_start, sources)
    threads = (f"{args.threads} threads: `n_threads={args.threads}` on every turboquant add and search"
               + (f", `faiss.omp_set_num_threads({args.threads})` (FAISS {faiss.__version__}, "
                  f"{faiss.get_compile_options().strip()})" if faiss is not None else "")
               + f"; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')};")
    run = [threads,
           (f"k = {K}; queries/s: {singles} single-query calls per round and one {BATCH}-query call, "
            f"fastest of {rounds} rounds after a warm-up, every method's rounds interleaved; build: FAISS "
            f"train (once) + add, ours add (adds: fastest of {ADD_ROUNDS});"),
           ("bits: nominal bits per coordinate; code B: bytes of one vector's code (ours `code_size`, the "
            "float32 norm included; FAISS `sa_code_size()`); held B: bytes the index holds per vector "
            "(ours `nbytes / len`, with 8-byte ids and any kept originals; FAISS its codes array, no ids);"),
           ("recall@10: fraction of the true top-10 in the returned top-10; R1@k (recall@1@k): fraction of "
            f"queries whose true nearest neighbour is among the first k of one k={max(RECALL_KS)} search;"),
           f"FAISS trains on the base itself (at most {TRAIN_LIMIT} vectors, a seeded sample)."]
    print(f"Command: `{command}`\n")
    for line in environment + run + notes:
        print(f"- {line}")
    for result in results:
        print(f"\n### {result['dataset']}: n={result['n']}, {result['queries']} queries ({result['source']})\n")
        print("\n".join(method_table(result["methods"])))
        pairs = ratio_table(result["methods"])
        if len(pairs) > 2:
            print(f"\nours / FAISS at equal bits per coordinate ({result['dataset']}; > 1: ours is faster):\n")
            print("\n".join(pairs))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "environment": environment + run, "notes": notes,
                       "results": results}, out, indent=1)
    return results


if __name__ == "__main__":
    main()
