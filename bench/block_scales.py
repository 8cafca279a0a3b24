"""Relative MSE of block-scaled MSE codes against the paper's codes, on Gaussian vectors.

    python bench/block_scales.py      # d = 64 and 128, bits 1..4, 20,000 vectors each

Prints a Markdown table: bits per coordinate (everything counted) and the mean
relative error ``||x - x_hat||^2 / ||x||^2`` with its standard error.
"""

import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if any((ROOT / "turboquant" / "_kernels").glob("_core*")):
    sys.path.insert(0, str(ROOT))

from turboquant import TurboQuantMSE  # noqa: E402


def relative_error(quantizer, x):
    x_hat = quantizer.dequantize(quantizer.quantize(x))
    errors = ((x - x_hat) ** 2).sum(1) / (x ** 2).sum(1)
    return 8 * quantizer.code_bytes / x.shape[1], errors.mean(), errors.std(ddof=1) / np.sqrt(errors.size)


def main():
    rng = np.random.default_rng(0)
    print("| dim | bits | paper: bits/value | paper: rel. MSE | block_scales: bits/value | block_scales: rel. MSE |")
    print("|---:|---:|---:|---:|---:|---:|")
    for dim in (64, 128):
        x = rng.standard_normal((20000, dim))
        for bits in (1, 2, 3, 4):
            plain = relative_error(TurboQuantMSE(dim, bits), x)
            block = relative_error(TurboQuantMSE(dim, bits, block_scales=True), x)
            print(f"| {dim} | {bits} | {plain[0]:.3f} | {plain[1]:.5f} ± {plain[2]:.5f} "
                  f"| {block[0]:.3f} | {block[1]:.5f} ± {block[2]:.5f} |")


if __name__ == "__main__":
    main()
