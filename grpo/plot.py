"""Draws metric curves from a metrics.jsonl into a PNG (the README's reward curve).

    python -m grpo.plot --metrics=<workdir>/metrics.jsonl --out=reward.png \
        [--keys=reward_mean,eval_accuracy]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from grpo.metrics import read_metrics

DEFAULT_KEYS = ("reward_mean",)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("grpo.plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(
    metrics_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    keys: Sequence[str] = DEFAULT_KEYS,
) -> None:
    """One panel per key, metric against step; steps where a key is absent (eval) are skipped."""
    records = read_metrics(metrics_path)
    available = sorted({k for r in records for k, v in r.items() if v is not None} - {"step"})
    missing = [k for k in keys if k not in available]
    if not keys or missing:
        raise ValueError(
            f"{metrics_path}: no metric {missing or 'requested'}; available: {available}"
        )
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 1, sharex=True, figsize=(7, 2.8 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) <= 30 else None, markersize=3)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    out_dir = os.path.dirname(os.fspath(out_path))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grpo.plot", description=__doc__.split("\n")[0])
    parser.add_argument("--metrics", required=True, help="path to a metrics.jsonl")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="comma-separated metrics")
    args = parser.parse_args(argv)
    keys = [k for k in args.keys.split(",") if k]
    try:
        plot_metrics(args.metrics, args.out, keys)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
