"""Figures for results: the confusion matrix of an evaluation. matplotlib is optional (`pip install 'ffpipe[bench]'`)."""

from __future__ import annotations

from pathlib import Path

import torch


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]. (N,), (N,) -> (C, C)"""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(counts: torch.Tensor) -> list[float | None]:
    """Recall of every class: the share of its images predicted as it (None for a class with no images)."""
    totals = counts.sum(dim=1)
    return [None if t == 0 else round(counts[i, i].item() / t.item(), 4) for i, t in enumerate(totals)]


def plot_confusion(counts: torch.Tensor, classes: list[str], title: str, path: Path) -> Path:
    """A row-normalized confusion matrix as a PNG (each row: where that class's images went)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'ffpipe[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    c = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * c, 0.8 + 0.7 * c))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(c):
        for j in range(c):
            ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(c), classes, rotation=45, ha="right")
    ax.set_yticks(range(c), [f"{name} ({100 * rates[i, i]:.0f}%)" for i, name in enumerate(classes)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (per-class accuracy)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
