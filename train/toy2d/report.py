"""Outputs of the 2-D experiment: the markdown table, results.json, a scatter grid PNG and the sample files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from selfe.train.toy2d.experiment import METHODS
from selfe.utils.atomic import atomic_write_json


def markdown_table(results: dict) -> str:
    """One row per method and metric, one column per step count."""
    methods = results["methods"]
    steps = list(next(iter(methods.values()))["metrics"])
    metric_names = [
        m for m in ("precision", "coverage", "recall", "swd") if m in methods[METHODS[0]]["metrics"][steps[0]]
    ]
    lines = [
        "| method | metric | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for method in METHODS:
        for name in metric_names:
            values = " | ".join(f"{methods[method]['metrics'][s][name]:.3f}" for s in steps)
            lines.append(f"| {method} | {name} | {values} |")
    return "\n".join(lines)


def json_ready(results: dict) -> dict:
    out = {k: v for k, v in results.items() if k not in ("samples", "eval_labels")}
    out["methods"] = {
        m: {**r, "metrics": {str(s): v for s, v in r["metrics"].items()}} for m, r in results["methods"].items()
    }
    return out


def write_results_json(results: dict, path: Path) -> None:
    atomic_write_json(path, json_ready(results), indent=2)


def write_sample_files(results: dict, out_dir: Path) -> list[Path]:
    """DIR/{method}_{steps}.npz with arrays x (N, 2) float32 and y (N,) int64 labels."""
    paths = []
    labels = results["eval_labels"].numpy().astype(np.int64)
    for (method, steps), x in results["samples"].items():
        path = out_dir / f"{method}_{steps}.npz"
        tmp = out_dir / f".{method}_{steps}.tmp.npz"
        np.savez(tmp, x=x.numpy().astype(np.float32), y=labels)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_scatter_png(results: dict, heldout: tuple[torch.Tensor, torch.Tensor], path: Path) -> bool:
    """Methods x steps scatter plots (plus the held-out data); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = list(next(iter(results["methods"].values()))["metrics"])
    fig, axes = plt.subplots(len(METHODS), len(steps) + 1, figsize=(2.6 * (len(steps) + 1), 2.6 * len(METHODS)))
    labels = results["eval_labels"].numpy()
    x_ref, y_ref = (t.numpy() for t in heldout)
    finite = x_ref[np.isfinite(x_ref).all(1)]
    lim = float(np.abs(finite).max()) * 1.25 if len(finite) else 3.0
    for row, method in enumerate(METHODS):
        ax = axes[row, 0]
        ax.scatter(x_ref[:, 0], x_ref[:, 1], c=y_ref, s=1, cmap="tab10", vmin=0, vmax=9)
        ax.set_title("held-out data", fontsize=8)
        for col, s in enumerate(steps, start=1):
            ax = axes[row, col]
            x = results["samples"][(method, s)].numpy()
            ax.scatter(x[:, 0], x[:, 1], c=labels, s=1, cmap="tab10", vmin=0, vmax=9)
            precision = results["methods"][method]["metrics"][s]["precision"]
            ax.set_title(f"{method}, {s} step{'s' * (s > 1)}\nprecision {precision:.2f}", fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True
