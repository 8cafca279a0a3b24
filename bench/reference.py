"""Plain-numpy TurboQuant, the baseline of every benchmark, and the comparison table.

:class:`NumpyReferenceMSE` and :class:`NumpyReferenceProd` do what
``turboquant.TurboQuantMSE`` / ``TurboQuantProd`` do, the obvious numpy way and
all in float32: a dense orthogonal rotation ``x @ R.T`` (numpy's BLAS, as the
package's ``"dense"`` rotation), ``np.searchsorted`` against the same Lloyd-Max
boundaries, one ``uint8`` per index (no bit packing), QJL signs stored as
``int8``; dequantizing is ``centroids[idx] * norms`` then ``@ R``, and scoring
is dequantize followed by a matrix product with the queries.

:func:`format_table` turns measured medians into the markdown table printed by
``python -m pytest bench --benchmark-only`` and ``python bench/test_bench_quantizers.py``.
"""

import ctypes
import hashlib
import io
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np


def haar_rotation(dim, rng):
    """A Haar-random orthogonal ``(dim, dim)`` float32 matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return np.ascontiguousarray((q * signs).astype(np.float32))


class NumpyReferenceMSE:
    """TurboQuant-MSE in plain float32 numpy.

    Parameters
    ----------
    codebook : turboquant.Codebook
        ``centroids`` (2**b,) and ``boundaries`` (2**b - 1,), used as float32.
    dim : int
    seed : int
        Seed of the rotation (the reference draws its own; the timing does not
        depend on which orthogonal matrix it is).

    Codes are ``(idx, norms)``: ``idx`` (n, dim) uint8, ``norms`` (n,) float32.
    """

    def __init__(self, codebook, dim, seed=0):
        self.dim = dim
        self.rotation = haar_rotation(dim, np.random.default_rng(seed))
        self.centroids = np.asarray(codebook.centroids, dtype=np.float32)
        self.boundaries = np.asarray(codebook.boundaries, dtype=np.float32)

    def encode(self, x):
        """``(idx, norms, unit)``: indices, norms and the rotated unit vectors ``R x / ||x||``."""
        unit = x @ self.rotation.T
        norms = np.linalg.norm(x, axis=1)
        unit /= np.where(norms > 0, norms, 1)[:, None]
        # side="left": the index is the number of boundaries strictly below the value.
        idx = np.searchsorted(self.boundaries, unit).astype(np.uint8)
        return idx, norms, unit

    def quantize(self, x):
        idx, norms, _ = self.encode(x)
        return idx, norms

    def dequantize_rotated(self, idx, norms):
        out = self.centroids[idx]
        out *= norms[:, None]
        return out

    def dequantize(self, codes):
        idx, norms = codes
        return self.dequantize_rotated(idx, norms) @ self.rotation

    def inner_products(self, codes, queries):
        """(m, n) scores for (m, dim) queries, (n,) for one (dim,) query."""
        return queries @ self.dequantize(codes).T


class NumpyReferenceProd:
    """TurboQuant-Prod in plain float32 numpy: a ``(bits - 1)``-bit MSE stage, then
    ``np.sign(r @ S.T)`` of its residual with an i.i.d. Gaussian ``S``, as int8.

    Parameters
    ----------
    codebook : turboquant.Codebook
        The codebook of the MSE stage, i.e. of ``bits - 1`` bits.
    dim : int
    seed : int

    Codes are ``(idx, norms, signs, residual_norms)``.
    """

    def __init__(self, codebook, dim, seed=0):
        self.mse = NumpyReferenceMSE(codebook, dim, seed)
        rng = np.random.default_rng([seed, 1])
        self.sketch = rng.standard_normal((dim, dim)).astype(np.float32)
        self.scale = np.float32(math.sqrt(math.pi / 2.0) / dim)

    def quantize(self, x):
        idx, norms, residual = self.mse.encode(x)
        residual -= self.mse.centroids[idx]
        residual_norms = np.linalg.norm(residual, axis=1)
        signs = np.sign(residual @ self.sketch.T).astype(np.int8)
        return idx, norms, signs, residual_norms

    def dequantize(self, codes):
        idx, norms, signs, residual_norms = codes
        rotated = self.mse.centroids[idx]
        qjl = signs.astype(np.float32) @ self.sketch
        qjl *= (self.scale * residual_norms)[:, None]
        rotated += qjl
        rotated *= norms[:, None]
        return rotated @ self.mse.rotation

    def inner_products(self, codes, queries):
        return queries @ self.dequantize(codes).T


# ---------------------------------------------------------------------------
# The comparison table
# ---------------------------------------------------------------------------

#: ratio ``reference_time / turboquant_time`` targeted for each (operation, rotation).
TARGETS = {
    ("MSE quantize", "dense"): 3.0,
    ("MSE quantize", "hadamard"): 10.0,
    ("MSE inner_products, 1 query", "dense"): 20.0,
    ("MSE inner_products, 1 query", "hadamard"): 20.0,
}

#: what one unit of work is, per operation (vectors/s, codes/s or query-code pairs/s).
UNITS = {
    "quantize": "vectors",
    "dequantize": "vectors",
    "inner_products, 1 query": "codes",
    "inner_products, 32 queries": "query-code pairs",
}


def unit_of(operation):
    return next(unit for suffix, unit in UNITS.items() if operation.endswith(suffix))


class Results:
    """Medians (seconds) and peak memory (bytes) of the benchmarks of one run.

    Keyed by ``(operation, d, b, implementation)``; implementation is
    ``"reference"`` or a turboquant rotation (``"dense"``, ``"hadamard"``).
    """

    def __init__(self):
        self.entries = {}
        self.notes = []  # lines describing the run (n per d, rounds), printed above the table

    def add(self, operation, d, b, implementation, *, n, items, seconds, best, peak_bytes=None):
        """Record a median (``seconds``) and the fastest round (``best``) of one case."""
        self.entries[operation, d, b, implementation] = {
            "n": n, "items": items, "seconds": seconds, "best": best, "peak_bytes": peak_bytes}

    def add_timings(self, operation, d, b, implementation, *, n, items, timings, peak_bytes=None):
        self.add(operation, d, b, implementation, n=n, items=items,
                 seconds=statistics.median(timings), best=min(timings), peak_bytes=peak_bytes)

    def rows(self):
        """One row per (operation, d, b, turboquant rotation) with both sides measured."""
        rows = []
        for (operation, d, b, impl), ours in self.entries.items():
            if impl == "reference":
                continue
            ref = self.entries.get((operation, d, b, "reference"))
            if ref is None:
                continue
            rows.append({
                "operation": operation, "d": d, "b": b, "rotation": impl, "n": ours["n"],
                "ref_rate": ref["items"] / ref["seconds"],
                "ours_rate": ours["items"] / ours["seconds"],
                "ratio": ref["seconds"] / ours["seconds"],
                "ratio_best": ref["best"] / ours["best"],
                "ref_peak": ref["peak_bytes"], "ours_peak": ours["peak_bytes"],
                "target": TARGETS.get((operation, impl)),
            })
        return rows

    def ratio_lines(self):
        """``reference_time / turboquant_time`` lines, one per (operation, d, b)."""
        lines = []
        groups = {}
        for row in self.rows():
            groups.setdefault((row["operation"], row["d"], row["b"], row["n"]), []).append(row)
        for (operation, d, b, n), rows in groups.items():
            parts = []
            for row in rows:
                mark = ""
                if row["target"] is not None:
                    mark = " (target >= {:g}x: {})".format(
                        row["target"], "met" if row["ratio"] >= row["target"] else "NOT met")
                parts.append(f"{row['rotation']} {row['ratio']:.2f}x{mark} "
                             f"[best rounds: {row['ratio_best']:.2f}x]")
            lines.append(f"{operation} d={d} b={b} n={n}: reference_time / turboquant_time = "
                         + ", ".join(parts))
        return lines


def _rate(value):
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    return f"{value / 1e3:.1f} k"


def _megabytes(value):
    return "?" if value is None else f"{value / 2**20:.0f}"


def format_table(results, *, command, environment):
    """Markdown table of a :class:`Results`, with the command and environment above it."""
    lines = [
        f"Command: `{command}`",
        "",
        *(f"- {line}" for line in environment),
        "- rates are per second, from the median round; `ratio` is "
        "reference_time / turboquant_time of the medians (higher is better), `best` the same "
        "for the fastest round of each side (less sensitive to other load on the machine);",
        "- `rotation` is turboquant's: `dense` = Haar matrix by BLAS (Prod: Gaussian QJL "
        "sketch), `hadamard` = randomized Hadamard kernel (Prod: Hadamard sketch too); the "
        "reference is always the dense float32 numpy pipeline of `bench/reference.py`;",
        "- peak MB: largest extra memory one call allocated through numpy (tracemalloc).",
        "",
        "| operation | d | b | rotation | n | unit | reference /s | turboquant /s | ratio "
        "| best | target (on ratio) | peak MB ref / tq |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in results.rows():
        target = ""
        if row["target"] is not None:
            met = "met" if row["ratio"] >= row["target"] else "**not met**"
            target = f"≥ {row['target']:g}× {met}"
        lines.append(
            f"| {row['operation']} | {row['d']} | {row['b']} | {row['rotation']} | {row['n']} "
            f"| {unit_of(row['operation'])} | {_rate(row['ref_rate'])} | {_rate(row['ours_rate'])} "
            f"| {row['ratio']:.2f}× | {row['ratio_best']:.2f}× | {target} "
            f"| {_megabytes(row['ref_peak'])} / {_megabytes(row['ours_peak'])} |")
    return "\n".join(lines)


def blas_core():
    """``(library, kernel)`` numpy's BLAS runs, e.g. ``("OpenBLAS 0.3.31 ...", "Haswell")``.

    threadpoolctl when it is installed; otherwise OpenBLAS's own ``get_corename``
    found in the loaded library; otherwise ``(build configuration, "unknown")``.
    """
    try:
        import threadpoolctl
    except ImportError:
        pass
    else:
        for info in threadpoolctl.threadpool_info():
            if info.get("user_api") == "blas":
                return (f"{info.get('internal_api')} {info.get('version')}, "
                        f"{info.get('num_threads')} threads", str(info.get("architecture")))
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "blas" in line and ".so" in line}
    except OSError:
        paths = set()
    for path in sorted(paths):
        library = ctypes.CDLL(path)
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                corename = getattr(library, f"{prefix}get_corename{suffix}", None)
                config = getattr(library, f"{prefix}get_config{suffix}", None)
                if corename is not None and config is not None:
                    corename.restype = config.restype = ctypes.c_char_p
                    return config().decode().strip(), corename().decode()
    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name')} {blas.get('version')}", "unknown"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} logical CPUs, {simd}"


def load_average():
    """1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _load(value):
    return "unknown" if value is None else f"{value:.2f}"


def source_digest():
    """``"<package dir> (sha256 ...)"`` of the imported turboquant's .py/.pyx/.so files.

    Call it when the run starts: the sources may be edited while a run goes on.
    """
    import turboquant as tq

    package = pathlib.Path(tq.__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted([*package.glob("*.py"), *package.glob("*.pyx"), *package.glob("*.so")]):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return f"{package} (sha256 of its .py/.pyx/.so files at the start: {digest.hexdigest()[:12]})"


def environment_lines(load_at_start=None, sources=None):
    """Facts a reader needs to compare runs: versions, threads, CPU, BLAS kernel, machine load."""
    import turboquant as tq

    config = tq.show_config(file=io.StringIO())
    library, kernel = blas_core()
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    return [
        f"turboquant {config['version']} (OpenMP {'on' if config['openmp'] else 'off'}, "
        f"{tq.resolve_n_threads()} threads), numpy {np.__version__}, Python {platform.python_version()};",
        f"turboquant sources measured: {sources or source_digest()};",
        f"CPU: {cpu_model()};",
        f"numpy BLAS: {library}; kernel in use: {kernel}"
        + (f" (forced by OPENBLAS_CORETYPE={coretype})" if coretype else "") + ";",
        f"1-minute load average: {_load(load_at_start)} at start, {_load(load_average())} at end "
        f"(anything above 0 is other work competing for the {os.cpu_count()} CPUs);",
    ]


def prefer_in_place_build():
    """Put the checkout ahead of an installed turboquant when the extension is
    built in place (``python setup.py build_ext --inplace``); call it before
    importing turboquant in a script."""
    root = pathlib.Path(__file__).resolve().parent.parent
    if any((root / "turboquant" / "_kernels").glob("_core.*")):
        sys.path.insert(1, str(root))


def interleaved_minima(functions, rounds):
    """``{name: fastest seconds}`` of the zero-argument ``functions`` (a dict),
    each called once to warm up, then once per round, the order reversed every
    other round so that all of them see the same machine load."""
    best = {name: math.inf for name in functions}
    for run in functions.values():
        run()
    names = list(functions)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            functions[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def command_line(script, argv=None):
    """``python bench/<script> <arguments>``: the command a table says it came from."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return " ".join([f"python bench/{script}", *arguments])
