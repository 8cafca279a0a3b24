"""Fit the codebooks and scale factors of block-scaled MSE codes; writes ``turboquant/quant/_block_tables.py``.

    python bench/fit_block_tables.py 1 2 3 4    # the bit widths to fit (the package ships 1..4)

Block-scaled codes (``TurboQuantMSE(..., block_scales=True)``) store a vector
``y`` (already rotated) as ``g = rms(y)`` rounded to float16, one of
``SCALE_LEVELS`` factors ``f[k]`` per block of ``BLOCK`` coordinates, and a
``bits``-bit index per coordinate into a codebook ``c``:
``y[j] ~ g * f[k(block of j)] * c[index j]``. The encoder picks, per block, the
factor with the least squared error. After a random rotation the coordinates
are close to iid Gaussian, so ``c`` and ``f`` are fitted jointly to Gaussian
vectors (d = 64) by alternating minimisation, from the Lloyd-Max Gaussian
codebook and factors spaced geometrically in [0.5, 1.5]: assign every block
its best factor and indices, then refit ``c`` (weighted least squares per
cell, symmetrised) and ``f`` (least squares per factor). The samples come from
numpy's PCG64 with a fixed seed, and the tables are rounded to float32, so the
written file is what the package uses on every machine.
"""

import pathlib
import sys

import numpy as np

BLOCK = 16
SCALE_LEVELS = 16
DIM = 64
ITERATIONS = 12
OUT = pathlib.Path(__file__).resolve().parent.parent / "turboquant" / "quant" / "_block_tables.py"


def fp16(x):
    return x.astype(np.float16).astype(np.float64)


def lloyd_max_gaussian(levels, rng, iterations=100):
    z = rng.standard_normal(400_000)
    c = np.quantile(z, (np.arange(levels) + 0.5) / levels)
    for _ in range(iterations):
        cells = np.searchsorted((c[1:] + c[:-1]) / 2, z)
        c = np.bincount(cells, z, levels) / np.maximum(np.bincount(cells, None, levels), 1)
    return c


def assign(x, c, factors):
    """Per row g, per block the best factor index and its cell indices, and the squared error."""
    n = x.shape[0]
    g = fp16(np.sqrt((x * x).mean(1)))[:, None, None]
    blocks = x.reshape(n, DIM // BLOCK, BLOCK)
    bounds = (c[1:] + c[:-1]) / 2
    best = np.full(blocks.shape[:2], np.inf)
    best_k = np.zeros(blocks.shape[:2], dtype=np.int64)
    best_cells = np.zeros(blocks.shape, dtype=np.int64)
    for k, f in enumerate(factors):
        scale = g * f
        cells = np.searchsorted(bounds, blocks / scale)
        err = ((blocks - scale * c[cells]) ** 2).sum(-1)
        better = err < best
        best[better], best_k[better], best_cells[better] = err[better], k, cells[better]
    return g, best_k, best_cells, best.sum() / (x * x).sum()


def fit(bits, rng, rows):
    c = lloyd_max_gaussian(2**bits, rng)
    factors = np.exp(np.linspace(np.log(0.5), np.log(1.5), SCALE_LEVELS))
    for _ in range(ITERATIONS):
        x = rng.standard_normal((rows, DIM))
        g, k, cells, error = assign(x, c, factors)
        blocks = x.reshape(cells.shape)
        scale = np.broadcast_to(g * factors[k][:, :, None], cells.shape)
        c = (np.bincount(cells.ravel(), (scale * blocks).ravel(), c.size)
             / np.maximum(np.bincount(cells.ravel(), (scale * scale).ravel(), c.size), 1e-300))
        c = (c - c[::-1]) / 2
        q = c[cells] * np.broadcast_to(g, cells.shape)
        for level in range(SCALE_LEVELS):
            chosen = k == level
            if chosen.any():
                factors[level] = (blocks[chosen] * q[chosen]).sum() / (q[chosen] ** 2).sum()
        factors.sort()
    return c.astype(np.float32), factors.astype(np.float32), error


def main():
    rng = np.random.default_rng(20260411)
    lines = ['"""Codebooks and scale factors of block-scaled MSE codes, written by ``bench/fit_block_tables.py``."""',
             "", f"BLOCK = {BLOCK}", f"SCALE_LEVELS = {SCALE_LEVELS}", "",
             "#: bits -> (codebook of 2**bits float32 values, SCALE_LEVELS float32 factors, fitted relative MSE)",
             "TABLES = {"]
    for bits in sorted({int(arg) for arg in sys.argv[1:]} or {1, 2, 3, 4}):
        c, f, error = fit(bits, rng, 40_000)
        print(f"bits {bits}: relative MSE {error:.6f}", file=sys.stderr, flush=True)
        lines.append(f"    {bits}: (")
        lines.append("        (" + ", ".join(repr(float(v)) for v in c) + ",),")
        lines.append("        (" + ", ".join(repr(float(v)) for v in f) + ",),")
        lines.append(f"        {error:.6g},")
        lines.append("    ),")
    lines.append("}")
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
