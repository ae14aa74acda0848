"""PNG plots of the evaluate node (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str, path: Path
) -> Path:
    import numpy as np

    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 1.2 + 1.1 * len(labels)))
    ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1.0, m.max()))
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}",
                ha="center",
                va="center",
                color="white" if m[i, j] > m.max() / 2 else "black",
            )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def group_bars_png(
    groups: dict[str, dict[str, dict[str, Any]]],
    metrics: Sequence[str],
    title: str,
    path: Path,
) -> Path:
    """Bars per group value: ``groups[model][group][metric]`` (model = fine_tuned | base). None → 0
    bar with an 'n/a' mark."""
    import numpy as np

    plt = _plt()
    models = list(groups)
    names = sorted({g for m in models for g in groups[m]})
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(min(7.0, 2.5 + 0.5 * len(names)) * len(metrics), 3.8), squeeze=False
    )
    width = 0.8 / max(1, len(models))
    x = np.arange(len(names))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for k, model in enumerate(models):
            vals = [groups[model].get(n, {}).get(metric) for n in names]
            ax.bar(x + k * width - 0.4 + width / 2, [v or 0.0 for v in vals], width, label=model)
            for xi, v in zip(x, vals, strict=True):
                if v is None:
                    ax.text(
                        xi + k * width - 0.4 + width / 2, 0.01, "n/a", ha="center", fontsize=7, rotation=90
                    )
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(metric)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """Rows of a train_log.jsonl with a numeric ``step`` and ``loss``; bad lines are skipped."""
    from dagtune.jsonl import read_records

    num = (int, float)
    return [
        r for r in read_records(path) if isinstance(r.get("loss"), num) and isinstance(r.get("step"), num)
    ]


def loss_curves_png(logs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One panel per training node: training loss against optimizer step."""
    plt = _plt()
    names = list(logs) or ["(no training logs)"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = logs.get(name) or []
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".", lw=1)
        else:
            ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
