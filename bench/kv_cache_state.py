"""How much the state of the machine before a call costs one ``attention_output``.

    python bench/kv_cache_state.py [--tokens 4096] [--rounds 300]

One float32 query over a ``KVCacheConfig(128)`` cache (4-bit MSE keys and
values) of ``--tokens`` tokens, timed right after each of:

* ``warm``: the previous call (codes and scratch in the caches);
* ``after reference``: the numpy reference's ``attention_output`` (what the
  alternating rounds of ``test_bench_kv_cache.py`` see);
* ``after 8 MB of writes``: unrelated numpy work that evicts the L2 cache;
* ``after 5 ms of sleep``: the core idle in between.

Prints the minimum and the median over the rounds, in microseconds.
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when OpenMP loads (README, threads)

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import turboquant as tq  # noqa: E402
from kv_reference import NumpyKVCacheReference  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    dim, n = 128, args.tokens
    keys = rng.standard_normal((n, dim), dtype=np.float32)
    values = rng.standard_normal((n, dim), dtype=np.float32)
    query = rng.standard_normal(dim, dtype=np.float32)
    cache = tq.QuantizedKVCache(tq.KVCacheConfig(dim))
    cache.append(keys, values)
    reference = NumpyKVCacheReference.like(cache)
    reference.append(keys, values)
    scratch = np.ones(1 << 20)
    before = {
        "warm": lambda: None,
        "after reference": lambda: reference.attention_output(query),
        "after 8 MB of writes": lambda: scratch.__iadd__(1.0),
        "after 5 ms of sleep": lambda: time.sleep(0.005),
    }
    print(f"attention_output, 1 query, n = {n}: microseconds (min / median of {args.rounds} rounds)")
    for name, prepare in before.items():
        times = []
        for _ in range(args.rounds):
            prepare()
            start = time.perf_counter()
            cache.attention_output(query)
            times.append(time.perf_counter() - start)
        print(f"  {name:22s} {min(times) * 1e6:8.1f} / {np.median(times) * 1e6:8.1f}")


if __name__ == "__main__":
    main()
