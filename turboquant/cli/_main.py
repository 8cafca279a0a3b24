"""The ``turboquant`` command: compress vectors, build and query an index, run a model with the cache.

Every command prints a short report (``--json`` prints it as one JSON object
instead), shows progress on stderr for work longer than about a second
(``--quiet`` hides it) and exits with 0 on success, 2 for bad usage and 1 for
any other failure, reported as one line on stderr.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from .._errors import TurboQuantError
from .._version import __version__
from ._progress import Progress
from ._vectors import UsageError, blocks, open_vectors

EXTRAS = ("numpy", "torch", "transformers", "gguf", "faiss", "matplotlib", "tqdm")
SAMPLE_ROWS = 2000


class _Parser(argparse.ArgumentParser):
    """argparse, exiting with 2 and one line for bad usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _emit(args, report, lines):
    """Print ``report`` as JSON with ``--json``, else the human-readable ``lines``."""
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print("\n".join(lines))


def _nbytes(path):
    return os.path.getsize(path)


# -- info ---------------------------------------------------------------------------------------------

def _info(args):
    import importlib.metadata
    import importlib.util

    from .._kernels import _core
    found = {}
    for name in EXTRAS:
        if importlib.util.find_spec(name) is None:
            found[name] = None
            continue
        distribution = {"faiss": "faiss-cpu"}.get(name, name)
        try:
            found[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "installed"
    report = {"version": __version__, "openmp": bool(_core.openmp_enabled()), "threads": _core.max_threads(),
              "processors": _core.num_procs(), "kernel_variant": _core._kernel_variant(),
              "kernel_variants": _core._kernel_variants(), "extras": found}
    lines = [f"turboquant {__version__}",
             f"kernels: {report['kernel_variant']} (available: {', '.join(report['kernel_variants'])})",
             f"OpenMP: {'on' if report['openmp'] else 'off'}, {report['threads']} threads, "
             f"{report['processors']} processors",
             "extras: " + ", ".join(f"{name} {version}" if version else f"{name} (not installed)"
                                    for name, version in found.items())]
    _emit(args, report, lines)


# -- compress / decompress / inspect ------------------------------------------------------------------

def _errors_on_sample(quantizer, sample, seed=0):
    """Relative MSE and the rms inner-product error (against random unit queries) on ``sample``."""
    recon = quantizer.dequantize(quantizer.quantize(sample))
    norms = np.sum(sample.astype(np.float64) ** 2, axis=1)
    nonzero = norms > 0
    mse = float(np.mean(np.sum((recon - sample) ** 2, axis=1)[nonzero] / norms[nonzero])) if nonzero.any() else 0.0
    queries = np.random.default_rng(seed).standard_normal((16, sample.shape[1]))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    error = queries @ (recon - sample).T
    return mse, float(np.sqrt(np.mean(error ** 2)))


def _compress(args):
    from ..quant import MSECodes, TurboQuantMSE
    vectors = open_vectors(args.input)
    n, dim = vectors.shape
    quantizer = TurboQuantMSE(dim, args.bits, seed=args.seed, rotation=args.rotation)
    layout = quantizer.spec.row_layout()
    indices = np.empty((n, layout["indices"][1]), dtype=np.uint8)
    norms = np.empty(n, dtype=np.float32)
    started = time.perf_counter()
    with Progress(n, "compress", quiet=args.quiet, unit="vectors") as bar:
        for start, block in blocks(vectors):
            codes = quantizer.quantize(block, n_threads=args.threads)
            indices[start:start + len(block)] = codes.indices
            norms[start:start + len(block)] = codes.norms
            bar.update(len(block))
    seconds = time.perf_counter() - started
    codes = MSECodes.from_arrays(quantizer.spec, indices=indices, norms=norms)
    codes.save(args.output)
    sample = np.asarray(vectors[:SAMPLE_ROWS], dtype=np.float64)
    mse, ip_error = _errors_on_sample(quantizer, sample) if n else (0.0, 0.0)
    report = {"input": args.input, "output": args.output, "vectors": n, "dim": dim, "bits": args.bits,
              "rotation": args.rotation, "bytes_in": n * dim * vectors.dtype.itemsize,
              "bytes_out": _nbytes(args.output), "relative_mse": mse, "ip_rms_error": ip_error,
              "sample": len(sample), "seconds": seconds}
    ratio = report["bytes_in"] / max(1, report["bytes_out"])
    _emit(args, report, [
        f"{n} vectors of dim {dim} -> {args.output} ({args.bits} bits, {args.rotation} rotation)",
        f"bytes: {report['bytes_in']:,} -> {report['bytes_out']:,} ({ratio:.1f}x smaller)",
        f"on {len(sample)} vectors: relative MSE {mse:.5f}, inner-product rms error {ip_error:.5f}",
        f"time: {seconds:.2f} s ({n / max(seconds, 1e-9):,.0f} vectors/s)"])


def _decompress(args):
    from .. import io
    from ..quant import MSECodes, TurboQuantMSE
    codes = io.load(args.input, mmap=True)
    if not isinstance(codes, MSECodes):
        raise UsageError(f"{args.input}: holds a {type(codes).__name__}, not the codes `compress` writes")
    spec = codes.spec
    quantizer = TurboQuantMSE(spec.dim, spec.bits, seed=spec.seed, rotation=spec.rotation,
                              block_scales=spec.block_scales)
    out = np.lib.format.open_memmap(args.output, mode="w+", dtype=np.float32, shape=(len(codes), spec.dim))
    with Progress(len(codes), "decompress", quiet=args.quiet, unit="vectors") as bar:
        for start in range(0, len(codes), 1 << 15):
            part = codes[start:start + (1 << 15)]
            out[start:start + len(part)] = quantizer.dequantize(part, dtype=np.float32, n_threads=args.threads)
            bar.update(len(part))
    out.flush()
    del out
    report = {"input": args.input, "output": args.output, "vectors": len(codes), "dim": spec.dim,
              "bytes_in": _nbytes(args.input), "bytes_out": _nbytes(args.output)}
    _emit(args, report, [f"{len(codes)} vectors of dim {spec.dim} -> {args.output} (float32)",
                         f"bytes: {report['bytes_in']:,} -> {report['bytes_out']:,}"])


def _inspect(args):
    from .. import io
    from ..io import _format
    if not os.path.exists(args.input):
        raise UsageError(f"{args.input}: no such file")
    payload = _format.read(args.input, mmap=True)
    with Progress(sum(payload.arrays[name].nbytes for name in payload.unverified), "inspect", quiet=args.quiet,
                  unit="B") as bar:
        for name in sorted(payload.unverified):
            payload.verify([name])
            bar.update(payload.arrays[name].nbytes)
    obj = io.load(args.input, mmap=True)
    arrays = {name: {"dtype": str(array.dtype), "shape": list(array.shape), "bytes": int(array.nbytes)}
              for name, array in payload.arrays.items()}
    report = {"file": args.input, "bytes": _nbytes(args.input), "kind": payload.kind,
              "format_version": _format.FORMAT_VERSION, "written_by": payload.version,
              "config": payload.config, "arrays": arrays, "object": repr(obj), "valid": True}
    lines = [f"{args.input}: {payload.kind}, {report['bytes']:,} bytes, format {_format.FORMAT_VERSION}, "
             f"written by turboquant {payload.version}; every checksum and field valid",
             f"object: {obj!r}", f"config: {json.dumps(payload.config, sort_keys=True)[:400]}"]
    shown = list(arrays.items())
    for name, entry in shown[:20]:
        lines.append(f"  {name}: {entry['dtype']} {tuple(entry['shape'])} ({entry['bytes']:,} bytes)")
    if len(shown) > 20:
        lines.append(f"  ... and {len(shown) - 20} more arrays")
    _emit(args, report, lines)


# -- index ---------------------------------------------------------------------------------------------

def _index_build(args):
    from ..index import TurboQuantIndex
    vectors = open_vectors(args.vectors)
    ids = None
    if args.ids is not None:
        ids = np.load(args.ids, allow_pickle=False) if os.path.exists(args.ids) else None
        if ids is None:
            raise UsageError(f"{args.ids}: no such file")
        if ids.shape != (vectors.shape[0],):
            raise UsageError(f"{args.ids}: shape {ids.shape}; expected ({vectors.shape[0]},)")
    index = TurboQuantIndex(vectors.shape[1], args.bits, metric=args.metric, seed=args.seed,
                            keep_originals=args.keep_originals)
    started = time.perf_counter()
    with Progress(vectors.shape[0], "index build", quiet=args.quiet, unit="vectors") as bar:
        for start, block in blocks(vectors):
            index.add(block, None if ids is None else ids[start:start + len(block)], n_threads=args.threads)
            bar.update(len(block))
    seconds = time.perf_counter() - started
    index.save(args.output)
    report = {"vectors": len(index), "dim": index.dim, "bits": index.bits, "metric": index.metric,
              "output": args.output, "bytes": _nbytes(args.output), "seconds": seconds}
    _emit(args, report, [f"{len(index)} vectors of dim {index.dim} -> {args.output} "
                         f"({index.bits} bits, {index.metric}, {report['bytes']:,} bytes)",
                         f"time: {seconds:.2f} s ({len(index) / max(seconds, 1e-9):,.0f} vectors/s)"])


def _search_all(index, queries, k, rerank, threads, quiet):
    """(scores, ids, seconds) of every query, in blocks with progress."""
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    ids = np.empty((queries.shape[0], k), dtype=np.int64)
    seconds = 0.0
    with Progress(queries.shape[0], "search", quiet=quiet, unit="queries") as bar:
        for start, block in blocks(queries, rows=256):
            started = time.perf_counter()
            found = index.search(block, k, rerank=rerank, n_threads=threads)
            seconds += time.perf_counter() - started
            scores[start:start + len(block)], ids[start:start + len(block)] = found
            bar.update(len(block))
    return scores, ids, seconds


def _load_index(path):
    from ..index import TurboQuantIndex
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    return TurboQuantIndex.load(path, mmap=True)


def _index_search(args):
    index = _load_index(args.index)
    queries = open_vectors(args.queries)
    scores, ids, seconds = _search_all(index, queries, args.k, args.rerank, args.threads, args.quiet)
    np.save(args.output, ids, allow_pickle=False)
    scores_path = args.scores or os.path.splitext(args.output)[0] + ".scores.npy"
    np.save(scores_path, scores, allow_pickle=False)
    report = {"queries": len(queries), "k": args.k, "output": args.output, "scores": scores_path,
              "seconds": seconds, "queries_per_second": len(queries) / max(seconds, 1e-9)}
    _emit(args, report, [f"{len(queries)} queries, k={args.k}: ids -> {args.output}, scores -> {scores_path}",
                         f"{report['queries_per_second']:,.0f} queries/s"])


def _index_eval(args):
    index = _load_index(args.index)
    queries = open_vectors(args.queries)
    if not os.path.exists(args.truth):
        raise UsageError(f"{args.truth}: no such file")
    truth = np.load(args.truth, allow_pickle=False)
    if truth.ndim != 2 or truth.shape[0] != queries.shape[0] or truth.dtype.kind not in "iu":
        raise UsageError(f"{args.truth}: expected ({queries.shape[0]}, >= k) integer ids, got {truth.shape} "
                         f"{truth.dtype}")
    k = min(args.k, truth.shape[1])
    _, ids, seconds = _search_all(index, queries, k, args.rerank, args.threads, args.quiet)
    recall = float(np.mean([len(set(found) & set(true[:k])) / k for found, true in zip(ids, truth)]))
    recall_1 = float(np.mean([true[0] in found for found, true in zip(ids, truth)]))
    report = {"queries": len(queries), "k": k, f"recall_at_{k}": recall, f"recall_1_at_{k}": recall_1,
              "queries_per_second": len(queries) / max(seconds, 1e-9)}
    _emit(args, report, [f"recall@{k}: {recall:.4f}   recall@1@{k}: {recall_1:.4f}   "
                         f"{report['queries_per_second']:,.0f} queries/s ({len(queries)} queries)"])


# -- plots ----------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise UsageError('plots need matplotlib: pip install "cyturboquant[plot]"') from None
    return pyplot


def _plot(args):
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(6, 4))
    if args.what == "distortion":
        from ..__main__ import distortion_table
        with Progress(8, "distortion", quiet=args.quiet, unit="bit widths") as bar:
            rows = distortion_table(args.dim, args.n, 0, "dense", args.threads, progress=bar.update)
        bits = [row["bits"] for row in rows]
        axes.semilogy(bits, [row["measured"] for row in rows], "o-", label="TurboQuantMSE, measured")
        axes.semilogy(bits, [row["upper"] for row in rows], "--", label="upper bound sqrt(3) pi/2 4^-b")
        axes.semilogy(bits, [row["lower"] for row in rows], ":", label="lower bound 4^-b")
        reported = [row for row in rows if row["paper"] is not None]
        axes.semilogy([row["bits"] for row in reported], [row["paper"] for row in reported], "x", markersize=9,
                      label="the paper's reported values")
        axes.set_xlabel("bits per coordinate")
        axes.set_ylabel("E ||x - x_hat||^2 (unit x)")
        axes.set_title(f"distortion, d={args.dim}")
        report = {"plot": "distortion", "rows": rows}
    else:
        if args.results is None or not os.path.exists(args.results):
            raise UsageError("plot kv needs --results, the JSON that `turboquant kv eval --json` writes")
        with open(args.results) as file:
            results = json.load(file)
        presets = results.get("presets") if isinstance(results, dict) else None
        if not isinstance(presets, list) or not presets:
            raise UsageError(f"{args.results}: not the output of `turboquant kv eval --json`")
        for entry in presets:
            axes.semilogy([entry["bits_per_value"]], [max(entry["kl"], 1e-6)], "o")
            axes.annotate(entry["name"], (entry["bits_per_value"], max(entry["kl"], 1e-6)))
        axes.set_xlabel("bits per value held")
        axes.set_ylabel("next-token KL against the exact cache")
        axes.set_title("KV cache: fidelity against bits")
        report = {"plot": "kv", "presets": presets}
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best") if args.what == "distortion" else None
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    report["output"] = args.output
    _emit(args, report, [f"{args.what} plot -> {args.output}"])


# -- model commands (the hf extra) ------------------------------------------------------------------------

def _kv_eval(args):
    from ._model import kv_eval
    report = kv_eval(args.model, args.text, tokens=args.tokens, prompt=args.prompt, presets=args.presets,
                     quiet=args.quiet, threads=args.threads)
    lines = [f"{args.model}: {report['tokens']} tokens of {args.text}, prompt {report['prompt']}",
             "| cache | bits/value | KL | top-1 |", "|---|---|---|---|"]
    for entry in report["presets"]:
        lines.append(f"| {entry['name']} | {entry['bits_per_value']:.3f} | {entry['kl']:.4f} | "
                     f"{100 * entry['top1']:.2f}% |")
    _emit(args, report, lines)


def _generate(args):
    from ._model import generate
    report = generate(args.model, args.prompt, preset=args.preset, new_tokens=args.max_new_tokens,
                      stream=not args.json, threads=args.threads)
    _emit(args, report, [
        "",
        f"TurboQuantCache ({args.preset}): {report['tokens_per_second']:.1f} tokens/s, "
        f"{report['cache_bytes']:,} cache bytes",
        f"DynamicCache: {report['dynamic_tokens_per_second']:.1f} tokens/s, "
        f"{report['dynamic_cache_bytes']:,} cache bytes",
        f"ratio: {report['tokens_per_second'] / report['dynamic_tokens_per_second']:.2f}x speed, "
        f"{report['dynamic_cache_bytes'] / max(1, report['cache_bytes']):.1f}x smaller"])


# -- the parser -------------------------------------------------------------------------------------------

def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the report as one JSON object")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--threads", type=int, default=None, help="OpenMP threads (default: OMP_NUM_THREADS)")
    parser = _Parser(prog="turboquant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"turboquant {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    info = commands.add_parser("info", parents=[common], help="version, kernels, threads, optional extras")
    info.set_defaults(run=_info)

    compress = commands.add_parser("compress", parents=[common], help="quantize a .npy or .fvecs file")
    compress.add_argument("input", help="vectors: .npy (n, d) or .fvecs")
    compress.add_argument("-o", "--output", required=True, help="codes file to write")
    compress.add_argument("--bits", type=int, default=4, choices=range(1, 9), metavar="{1..8}")
    compress.add_argument("--rotation", choices=("hadamard", "dense"), default="hadamard")
    compress.add_argument("--seed", type=int, default=0)
    compress.set_defaults(run=_compress)

    decompress = commands.add_parser("decompress", parents=[common], help="codes back to float32 .npy")
    decompress.add_argument("input")
    decompress.add_argument("-o", "--output", required=True)
    decompress.set_defaults(run=_decompress)

    inspect = commands.add_parser("inspect", parents=[common], help="check a turboquant file and describe it")
    inspect.add_argument("input")
    inspect.set_defaults(run=_inspect)

    index = commands.add_parser("index", help="build, query and evaluate a search index")
    index_commands = index.add_subparsers(dest="index_command", metavar="ACTION", parser_class=_Parser)
    index_commands.required = True
    build = index_commands.add_parser("build", parents=[common], help="index a vectors file")
    build.add_argument("vectors")
    build.add_argument("-o", "--output", required=True)
    build.add_argument("--bits", type=int, default=4, choices=range(1, 9), metavar="{1..8}")
    build.add_argument("--metric", choices=("ip", "cosine", "l2"), default="ip")
    build.add_argument("--ids", help=".npy of one int64 id per vector")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--keep-originals", action="store_true", help="keep float32 copies for --rerank")
    build.set_defaults(run=_index_build)
    search = index_commands.add_parser("search", parents=[common], help="query an index")
    search.add_argument("index")
    search.add_argument("queries")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--rerank", type=int, default=0)
    search.add_argument("-o", "--output", required=True, help=".npy of the (m, k) ids")
    search.add_argument("--scores", help=".npy of the scores (default: OUTPUT with .scores.npy)")
    search.set_defaults(run=_index_search)
    evaluate = index_commands.add_parser("eval", parents=[common], help="recall and speed against true neighbours")
    evaluate.add_argument("index")
    evaluate.add_argument("queries")
    evaluate.add_argument("--truth", required=True, help=".npy (m, >= k) of the true neighbours' ids, best first")
    evaluate.add_argument("-k", type=int, default=10)
    evaluate.add_argument("--rerank", type=int, default=0)
    evaluate.set_defaults(run=_index_eval)

    kv = commands.add_parser("kv", help="KV-cache fidelity on a model (needs the hf extra)")
    kv_commands = kv.add_subparsers(dest="kv_command", metavar="ACTION", parser_class=_Parser)
    kv_commands.required = True
    kv_eval = kv_commands.add_parser("eval", parents=[common], help="next-token KL / top-1 / bits of presets")
    kv_eval.add_argument("model", help="a transformers model folder, or a .gguf file")
    kv_eval.add_argument("text", help="a text file")
    kv_eval.add_argument("--tokens", type=int, default=256, help="tokens of the text used (default 256)")
    kv_eval.add_argument("--prompt", type=int, default=64, help="tokens prefilled before decoding (default 64)")
    kv_eval.add_argument("--presets", nargs="+", default=["lossless", "balanced", "compact"],
                         choices=("lossless", "balanced", "compact", "4bit"))
    kv_eval.set_defaults(run=_kv_eval)

    gen = commands.add_parser("generate", parents=[common], help="stream text generated with the cache")
    gen.add_argument("model")
    gen.add_argument("prompt")
    gen.add_argument("--preset", choices=("lossless", "balanced", "compact"), default="balanced")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.set_defaults(run=_generate)

    plot = commands.add_parser("plot", parents=[common], help="plots (needs matplotlib)")
    plot.add_argument("what", choices=("distortion", "kv"))
    plot.add_argument("-o", "--output", required=True)
    plot.add_argument("--results", help="for kv: the JSON of `turboquant kv eval --json`")
    plot.add_argument("--dim", type=int, default=128)
    plot.add_argument("--n", type=int, default=4000)
    plot.set_defaults(run=_plot)
    return parser


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("k", "rerank", "tokens", "prompt", "max_new_tokens"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value < (0 if name == "rerank" else 1):
            parser.exit(2, f"turboquant: error: --{name.replace('_', '-')} must be >= "
                           f"{0 if name == 'rerank' else 1}\n")
    if args.threads is not None and args.threads == 0:
        parser.exit(2, "turboquant: error: --threads must not be 0\n")
    try:
        args.run(args)
    except (TurboQuantError, UsageError, OSError, ValueError, ImportError) as error:
        message = str(error) or type(error).__name__
        sys.stderr.write(f"turboquant: error: {message}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("turboquant: interrupted\n")
        return 1
    return 0
