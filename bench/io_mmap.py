"""Open a saved index memory-mapped against reading it whole.

Builds a TurboQuantIndex of n unit vectors (default 1,000,000 x 128, 4 bits),
saves it, then times ``TurboQuantIndex.load(path)`` (read, checksum and check
everything) against ``TurboQuantIndex.load(path, mmap=True)`` in the same run
(interleaved, best of several), and checks both answer a batch of queries
exactly as the index that was saved.

    python bench/io_mmap.py [--n 1000000] [--dim 128] [--bits 4] [--repeats 7]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from reference import command_line, interleaved_minima, prefer_in_place_build

prefer_in_place_build()

from turboquant import TurboQuantIndex  # noqa: E402


def build(n, dim, bits, seed=0):
    rng = np.random.default_rng(seed)
    index = TurboQuantIndex(dim, bits)
    for start in range(0, n, 1 << 17):
        block = rng.standard_normal((min(1 << 17, n - start), dim)).astype(np.float32)
        index.add(block / np.linalg.norm(block, axis=1, keepdims=True))
    return index


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(command_line("io_mmap.py", argv))
    index = build(args.n, args.dim, args.bits)
    queries = np.random.default_rng(1).standard_normal((16, args.dim)).astype(np.float32)
    expected = index.search(queries, 10)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.tq")
        started = time.perf_counter()
        index.save(path)
        saved = time.perf_counter() - started
        size = os.path.getsize(path)
        loaded = {}

        def full():
            loaded["full"] = TurboQuantIndex.load(path)

        def mapped():
            loaded["mmap"] = TurboQuantIndex.load(path, mmap=True)

        times = interleaved_minima({"full read": full, "mmap": mapped}, args.repeats)
        for name, other in loaded.items():
            scores, ids = other.search(queries, 10)
            if not (np.array_equal(scores, expected[0]) and np.array_equal(ids, expected[1])):
                sys.exit(f"{name} load answers differently")
    print(f"\nindex: {args.n} x {args.dim}, {args.bits} bits, file {size / 2**20:.1f} MiB, save {saved:.2f} s")
    print("\n| load | time | ratio |\n|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.2f} ms | {times['full read'] / seconds:.1f}x |")
    print("\nboth loads answer 16 queries (k=10) exactly as the saved index")


if __name__ == "__main__":
    main()
