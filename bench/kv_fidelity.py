"""Attention fidelity of the quantized KV cache on real attention vectors (and on synthetic decoder-like keys).

    python bench/kv_fidelity.py                      # MiniLM q/k/v of ../shared/data/minilm_qkv_dev.npz
    python bench/kv_fidelity.py --data PATH.npz      # another file with the same arrays
    python bench/kv_fidelity.py --synthetic          # also the synthetic decoder-like table

For every sequence, layer and head, the keys and values of the first ``seq_lens[s]``
tokens go into one ``QuantizedKVCache`` (the heads of a layer through a
``MultiHeadKVCache``, so head ``h`` uses seed ``42 + 1000 h``); every query of
the head then attends over them. Against the exact float64 attention
``softmax(q k^T / sqrt(head_dim)) v`` it reports, averaged over every query of
every sequence/layer/head:

* mean cosine between the exact and the cache's attention output;
* mean ``KL(exact || quantized)`` of the attention distributions (nats);
* effective key + value bits per channel, from ``stats()`` (codes, norms and the
  float32 sink/recent rows, divided by tokens x head_dim).

Variants: plain; ``sink_tokens=1``; ``residual_tokens=32``; both; 4 outlier key
channels with ``outlier_bits = key_bits + 1``; and the asymmetric budget
``key_bits = b + 1, value_bits = b - 1``. Each for MSE and Prod keys and b = 2, 3, 4.

The synthetic mode builds decoder-like heads (head_dim 128): keys with a few
channels 10-30x the median channel magnitude and a large component shared by all
tokens, queries with a shared component, and a first token every query attends
to strongly (an attention sink) with a small value.
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when OpenMP loads (README, threads)

import numpy as np

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
# Prefer an in-place build of the checkout over an installed package.
if any(name.startswith("_core.") for name in os.listdir(ROOT / "turboquant" / "_kernels")):
    sys.path.insert(0, str(ROOT))

import turboquant as tq  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "minilm_qkv_dev.npz"
BITS = (2, 3, 4)
STRATEGIES = ("mse", "prod")
SEED = 42
#: Results do not depend on the thread count. One thread: the scoring kernel opens one
#: parallel region per query, which on a busy machine costs more than these small heads.
N_THREADS = 1
#: logit boost of the synthetic sink token (gives it about half of the attention).
SINK_BOOST = 20.0


def variants(bits):
    """``(name, KVCacheConfig keyword arguments)`` of every variant valid at ``bits``."""
    out = [
        ("plain", {}),
        ("sink_tokens=1", {"sink_tokens": 1}),
        ("residual_tokens=32", {"residual_tokens": 32}),
        ("sinks+recent", {"sink_tokens": 1, "residual_tokens": 32}),
        (f"outlier_channels=4 @{min(bits + 1, 8)}b", {"outlier_channels": 4, "outlier_bits": min(bits + 1, 8)}),
        ("center_keys", {"center_keys": True}),
        ("center_keys+outliers", {"center_keys": True, "outlier_channels": 4,
                                  "outlier_bits": min(bits + 1, 8)}),
    ]
    if bits + 1 <= 8 and bits - 1 >= 1:
        out.append((f"asymmetric {bits + 1}/{bits - 1}", {"key_bits": bits + 1, "value_bits": bits - 1}))
    return out


# ---------------------------------------------------------------------------
# Exact attention and the measurement
# ---------------------------------------------------------------------------

def exact_attention(q, k, v):
    """(log-probabilities (m, L), output (m, d)) of float64 ``softmax(q k^T / sqrt(d)) v``."""
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    logits = q64 @ k64.T / np.sqrt(q.shape[-1])
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return log_p, np.exp(log_p) @ v64


class Workload:
    """Attention problems grouped as layers: ``layers`` is a list of ``(q, k, v)`` with
    q (heads, m, d), k and v (heads, L, d) float32; exact attention is computed once."""

    def __init__(self, name, layers):
        self.name = name
        self.layers = layers
        self.exact = [[exact_attention(q[h], k[h], v[h]) for h in range(q.shape[0])] for q, k, v in layers]
        self.dim = layers[0][1].shape[-1]

    @property
    def description(self):
        heads = sum(q.shape[0] for q, _, _ in self.layers)
        queries = sum(q.shape[0] * q.shape[1] for q, _, _ in self.layers)
        return f"{self.name}: {len(self.layers)} layer blocks, {heads} heads, {queries} queries, head_dim {self.dim}"


def measure(workload, config):
    """(mean cosine, mean KL, key bits/channel, value bits/channel) of ``config`` on ``workload``."""
    cosines, kls = [], []
    key_bytes = value_bytes = cells = 0
    for (q, k, v), exact in zip(workload.layers, workload.exact):
        cache = tq.MultiHeadKVCache(tq.MultiHeadConfig(q.shape[0], config))
        cache.append_all(k, v, n_threads=N_THREADS)
        for h, head in enumerate(cache.heads):
            queries = q[h].astype(np.float64)
            log_p, out = exact[h]
            weights = head.attention_weights(queries, n_threads=N_THREADS)
            approx = head.attention_output(queries, n_threads=N_THREADS)
            kl = np.sum(np.exp(log_p) * (log_p - np.log(np.maximum(weights, 1e-300))), axis=1)
            cos = np.sum(out * approx, axis=1) / (
                np.linalg.norm(out, axis=1) * np.linalg.norm(approx, axis=1) + 1e-300)
            kls.append(kl)
            cosines.append(cos)
        for stats in cache.stats().head_stats:
            key_bytes += stats.key_bytes
            value_bytes += stats.value_bytes
            cells += stats.num_tokens * stats.dim
    return (float(np.concatenate(cosines).mean()), float(np.concatenate(kls).mean()),
            8.0 * key_bytes / cells, 8.0 * value_bytes / cells)


def fidelity_rows(workload, bits_list):
    rows = []
    for bits in bits_list:
        for name, overrides in variants(bits):
            for strategy in STRATEGIES:
                settings = {"key_bits": bits, "value_bits": bits, "key_strategy": strategy, "seed": SEED,
                            **overrides}
                try:
                    config = tq.KVCacheConfig(workload.dim, **settings)
                except tq.InvalidParameterError as error:  # e.g. a bit width this strategy refuses
                    print(f"skipped {name} {strategy} b={bits}: {error}", file=sys.stderr)
                    continue
                cosine, kl, key_bpc, value_bpc = measure(workload, config)
                rows.append({"variant": name, "strategy": strategy,
                             "bits": f"{config.key_bits}/{config.value_bits}", "cosine": cosine, "kl": kl,
                             "key_bpc": key_bpc, "value_bpc": value_bpc})
    return rows


def format_table(rows):
    lines = ["| variant | strategy | bits k/v | mean cosine | mean KL (nats) | bits/channel k + v |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['strategy']} | {r['bits']} | {r['cosine']:.5f} | {r['kl']:.3g} "
                     f"| {r['key_bpc']:.2f} + {r['value_bpc']:.2f} = {r['key_bpc'] + r['value_bpc']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

def real_workload(path):
    data = np.load(path)
    missing = {"q", "k", "v", "seq_lens"} - set(data.files)
    if missing:
        sys.exit(f"kv_fidelity: {path} lacks the arrays {sorted(missing)}")
    q, k, v, lens = data["q"], data["k"], data["v"], data["seq_lens"]
    layers = []
    for s in range(q.shape[0]):
        n = int(lens[s])
        for layer in range(q.shape[1]):
            layers.append(tuple(np.ascontiguousarray(a[s, layer, :, :n]) for a in (q, k, v)))
    return Workload(f"{path.name} (sequence lengths {', '.join(str(int(x)) for x in lens)})", layers)


def synthetic_workload(seed=0, heads=8, tokens=512, queries=64, dim=128, outliers=4, shared=3.0,
                       sink_boost=SINK_BOOST):
    """Decoder-like heads (one layer block of ``heads`` heads).

    Keys ``k_t = D (mu + z_t)``: ``z_t`` ~ N(0, I), ``mu`` shared by every token (random signs
    times ``shared``), ``D`` = 1 except ``outliers`` channels at 10-30x. Queries ``c + n_t`` share
    ``c`` ~ N(0, I). The first token's key gets ``+ sink_boost sqrt(dim) c / ||c||^2``, which raises
    its logit by about ``sink_boost`` for every query (an attention sink), and its value is 10x
    smaller than the others.
    """
    rng = np.random.default_rng([seed, 2504])
    layers = []
    for _ in range(heads):
        scale = np.ones(dim)
        channels = rng.choice(dim, outliers, replace=False)
        scale[channels] = rng.uniform(10.0, 30.0, outliers)
        mu = shared * rng.choice([-1.0, 1.0], dim)
        keys = (mu + rng.standard_normal((tokens, dim))) * scale
        common = rng.standard_normal(dim)
        q = common + rng.standard_normal((queries, dim))
        keys[0] += sink_boost * np.sqrt(dim) * common / (common @ common)
        values = rng.standard_normal((tokens, dim))
        values[0] *= 0.1
        layers.append((q, keys, values))
    stack = [np.ascontiguousarray(np.stack([layer[i] for layer in layers]), dtype=np.float32) for i in range(3)]
    return Workload(f"synthetic decoder-like (seed {seed}, {outliers} outlier channels at 10-30x, shared "
                    f"key component {shared}x, sink on token 0)", [tuple(stack)])


def sink_share(workload):
    """Mean exact attention weight on token 0 (how strong the sink is)."""
    return float(np.mean([np.exp(log_p[:, 0]).mean() for layer in workload.exact for log_p, _ in layer]))


def outlier_ratio(workload):
    """Largest over median per-channel mean |key|, averaged over heads."""
    ratios = []
    for _, k, _ in workload.layers:
        for head in k:
            magnitude = np.abs(head).mean(axis=0)
            ratios.append(magnitude.max() / np.median(magnitude))
    return float(np.mean(ratios))


def report(workload, bits_list, title):
    start = time.perf_counter()
    rows = fidelity_rows(workload, bits_list)
    print(f"## {title}\n")
    print(f"- {workload.description};")
    print(f"- max/median channel magnitude of the keys: {outlier_ratio(workload):.1f}x; "
          f"mean exact attention on token 0: {sink_share(workload):.3f};")
    print(f"- {time.perf_counter() - start:.1f} s\n")
    print(format_table(rows))
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA,
                        help=f"npz with q, k, v (sequence, layer, head, token, dim) and seq_lens "
                             f"(default: {DEFAULT_DATA})")
    parser.add_argument("--synthetic", action="store_true",
                        help="also measure synthetic decoder-like keys (a second table)")
    parser.add_argument("--bits", type=int, nargs="+", default=list(BITS), choices=range(2, 8))
    args = parser.parse_args(argv)
    if not args.data.exists() and not args.synthetic:
        sys.exit(f"kv_fidelity: {args.data} does not exist. Pass --data PATH to an npz with q, k, v and "
                 "seq_lens (see ../shared/data/README.md), or --synthetic for the synthetic table alone.")
    argv_text = sys.argv[1:] if argv is None else argv
    print(f"Command: `python bench/kv_fidelity.py{' ' + ' '.join(argv_text) if argv_text else ''}`\n")
    print(f"turboquant {tq.__version__}, numpy {np.__version__}; mean over every query of "
          "KL(exact || quantized) and cosine(exact output, cache output), exact = float64 "
          "softmax(q k^T / sqrt(d)) v; bits/channel from stats().\n")
    if args.data.exists():
        report(real_workload(args.data), args.bits, "Real attention vectors (MiniLM, all queries)")
    else:
        print(f"(no real data: {args.data} does not exist; only the synthetic table)\n")
    if args.synthetic:
        report(synthetic_workload(), args.bits, "Synthetic decoder-like keys (64 queries per head)")


if __name__ == "__main__":
    main()
