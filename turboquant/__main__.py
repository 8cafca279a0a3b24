"""``python -m turboquant``: measure TurboQuant's distortion and print it beside the paper's.

For b = 1..8 it quantizes random unit vectors with :class:`TurboQuantMSE`,
measures ``E||x - x_hat||^2`` and, for :class:`TurboQuantProd`, the variance of
the inner-product error, and prints them beside the codebook's exact
expectation, the values the paper reports (b <= 4), its upper bound
``sqrt(3) pi / 2 * 4^-b`` and the lower bound ``4^-b``.
"""

import argparse
import math
import sys
import time

import numpy as np

from ._config import show_config
from .quant import TurboQuantMSE, TurboQuantProd

PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
UPPER_CONSTANT = math.sqrt(3.0) * math.pi / 2.0


def distortion_table(dim, n, seed, rotation, n_threads=None, progress=None):
    """Rows of measured and reference distortions for b = 1..8.

    Parameters
    ----------
    dim, n, seed : int
        Dimension, number of random unit vectors, seed of the data.
    rotation : {"dense", "hadamard"}
    n_threads : int or None
    progress : callable or None
        Called with 1 after each bit width (for progress bars).

    Returns
    -------
    list of dict
        Keys: ``bits``, ``measured``, ``expected``, ``paper`` (None for b > 4),
        ``upper``, ``lower``, ``prod_ip_var`` (times dim; None at b = 1),
        ``prod_ip_var_theory`` (times dim).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((32, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = q @ x.T
    rows = []
    for bits in range(1, 9):
        quantizer = TurboQuantMSE(dim, bits, seed=seed, rotation=rotation)
        x_hat = quantizer.dequantize(quantizer.quantize(x, n_threads=n_threads), n_threads=n_threads)
        row = {
            "bits": bits,
            "measured": float(np.mean(np.sum((x - x_hat) ** 2, axis=1))),
            "expected": quantizer.expected_distortion,
            "paper": PAPER_MSE.get(bits),
            "upper": UPPER_CONSTANT * 4.0 ** -bits,
            "lower": 4.0 ** -bits,
            "prod_ip_var": None,
            "prod_ip_var_theory": None,
        }
        if bits >= 2:
            prod = TurboQuantProd(dim, bits, seed=seed, rotation=rotation)
            estimate = prod.inner_products(prod.quantize(x, n_threads=n_threads), q, n_threads=n_threads)
            row["prod_ip_var"] = float(np.var(estimate - exact)) * dim
            row["prod_ip_var_theory"] = math.pi / 2.0 * prod.mse.expected_distortion
        rows.append(row)
        if progress is not None:
            progress(1)
    return rows


def _fmt(value, spec=".5f"):
    return "-" if value is None else format(value, spec)


SUMMARY = """\
More of turboquant, from this command line (`turboquant --help`, or `python -m turboquant COMMAND`):
  turboquant info                                   kernels, threads, optional extras
  turboquant compress X.npy -o X.tq --bits 4        quantize vectors (.npy / .fvecs, streamed)
  turboquant decompress X.tq -o X.npy | inspect X.tq
  turboquant index build X.npy -o X.index           search index; then `index search` / `index eval`
  turboquant kv eval MODEL TEXT                     KV-cache presets on a model (the hf extra)
  turboquant generate MODEL "prompt" --preset balanced
  turboquant plot distortion -o distortion.png      (the plot extra)"""


def main(argv=None):
    arguments = sys.argv[1:] if argv is None else list(argv)
    from .cli._main import build_parser
    commands = build_parser()._subparsers._group_actions[0].choices
    if arguments and arguments[0] in commands:
        from .cli import main as cli_main
        return cli_main(arguments)
    return distortion_main(arguments)


def distortion_main(argv=None):
    """The bare ``python -m turboquant``: the distortion table and a summary of the commands."""
    parser = argparse.ArgumentParser(prog="python -m turboquant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=128, help="vector dimension (default 128)")
    parser.add_argument("--n", type=int, default=20000, help="random unit vectors (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rotation", choices=("dense", "hadamard"), default="dense")
    parser.add_argument("--threads", type=int, default=None, help="OpenMP threads (default: OMP_NUM_THREADS)")
    args = parser.parse_args(argv)

    show_config()
    print()
    start = time.perf_counter()
    rows = distortion_table(args.dim, args.n, args.seed, args.rotation, args.threads)
    elapsed = time.perf_counter() - start
    print(f"TurboQuantMSE distortion E||x - x_hat||^2 over {args.n} random unit vectors, "
          f"d = {args.dim}, rotation = {args.rotation!r}")
    print(f"{'bits':>4} {'measured':>11} {'expected':>11} {'paper':>8} "
          f"{'upper':>11} {'4^-b':>11} {'ratio':>6} | {'Prod d*Var':>11} {'theory':>11}")
    for row in rows:
        print(f"{row['bits']:>4} {row['measured']:>11.4g} {row['expected']:>11.4g} "
              f"{_fmt(row['paper'], '.3g'):>8} {row['upper']:>11.4g} {row['lower']:>11.4g} "
              f"{row['measured'] / row['lower']:>6.3f} | {_fmt(row['prod_ip_var'], '.4g'):>11} "
              f"{_fmt(row['prod_ip_var_theory'], '.4g'):>11}")
    print(f"\nexpected: exact value of the Lloyd-Max codebook; paper: values reported in the paper; "
          f"upper: sqrt(3)*pi/2*4^-b; ratio: measured/4^-b.\nProd d*Var: dim times the variance of "
          f"the inner-product error over 32 unit queries; theory: pi/2 * D_mse(b-1).\n"
          f"({elapsed:.1f} s)")
    print()
    print(SUMMARY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
