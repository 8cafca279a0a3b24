"""Plot next-token KL against bits per value from a ``bench/real_model.py --json`` file.

    python bench/real_model.py --no-speed --no-check --json kv.json --configs ...
    python bench/plot_kv_frontier.py kv.json -o docs/kv_frontier.png

Every method of the run is one point (log KL against bits per value, everything
counted); TurboQuantCache configurations and presets are drawn apart from the
baselines, and each family's lower envelope (the best KL reached at or below
each number of bits) is joined up. Needs matplotlib (``pip install matplotlib``).
"""

import argparse
import json
import pathlib
import sys

OURS = "TurboQuantCache"
#: Shorter names of KVCacheConfig options in the point labels.
SHORT = (("block_scales=true", "block"), ("center_keys=true", "centered"), ("residual_tokens=", "recent "),
         ("residual_dtype=float16", "f16"), ("preset=", ""), (" + Hadamard rotation", " rot"), (",", ", "))


def short_label(label):
    """A point's label: the method without the class name, options abbreviated."""
    label = label.replace(OURS + " ", "")
    for long, short in SHORT:
        label = label.replace(long, short)
    return label


def frontier(points):
    """The points no other point beats at equal or fewer bits, by bits."""
    best, out = float("inf"), []
    for bits, kl, label in sorted(points):
        if kl < best:
            best = kl
            out.append((bits, kl, label))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=pathlib.Path, help="JSON written by bench/real_model.py --json")
    parser.add_argument("-o", "--output", type=pathlib.Path, required=True, help="image to write (.png, .svg)")
    parser.add_argument("--max-bits", type=float, default=9.0, help="right end of the bits axis (default 9)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_kv_frontier.py needs matplotlib: pip install matplotlib")

    data = json.loads(args.results.read_text())
    ours, baselines = [], []
    for label, row in data["fidelity"].items():
        if row["kl"] <= 0 or row["bits"] > args.max_bits:
            continue                      # the float32 reference
        (ours if label.startswith(OURS) else baselines).append((row["bits"], row["kl"], label))

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for points, color, marker, name in ((baselines, "tab:gray", "s", "baselines"),
                                        (ours, "tab:blue", "o", "turboquant")):
        if not points:
            continue
        ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, marker=marker, label=name,
                   zorder=3)
        edge = frontier(points)
        ax.step([p[0] for p in edge], [p[1] for p in edge], where="post", color=color, alpha=0.5, zorder=2)
        for bits, kl, label in points:
            ax.annotate(short_label(label), (bits, kl), textcoords="offset points", xytext=(4, 3),
                        fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("bits per key/value entry (everything counted)")
    ax.set_ylabel("next-token KL(reference || cache), nats")
    texts = len(data.get("texts", []))
    ax.set_title(f"SmolLM2-135M-Instruct, {texts} texts x {data.get('tokens')} tokens "
                 f"(prompt {data.get('prompt')}), decode positions", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
