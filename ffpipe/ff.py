"""The Forward-Forward math: pure tensor functions, no modules, no state, no I/O.

Shapes: B = batch, D = features, C = classes, H = hidden units.
Every function here is used unchanged by the in-process trainer and by the pipeline's workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor, kind: str = "rms", eps: float = 1e-8) -> torch.Tensor:
    """Length-normalize each row, so a layer sees only the direction of its input.

    "l2":  x / (||x||_2 + eps)            (the popular PyTorch example)
    "rms": x / sqrt(mean(x^2) + eps)      (Hinton's code; rows have unit mean square)
    """
    # (B, D) -> (B, D). A row holding NaN or Inf comes out all NaN: x / Inf alone would zero the row but the Inf,
    # which a layer might never read (pooling drops the edge), and the zeros would then train as an input
    if kind == "l2":
        norm = x.norm(p=2, dim=1, keepdim=True) + eps  # (B, 1): Inf or NaN where the row is not finite
        return x / torch.where(torch.isfinite(norm), norm, torch.nan)
    if kind == "rms":
        scale = torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)  # (B, 1): 0 or NaN where the row is not finite
        return x * torch.where(scale > 0, scale, torch.nan)
    raise ValueError(f"unknown normalization {kind!r} (expected 'l2' or 'rms')")


def goodness(h: torch.Tensor, kind: str = "mean") -> torch.Tensor:
    """Goodness of each row: the mean (or sum) of squared activities. (B, H) -> (B,)"""
    if kind == "mean":
        return h.pow(2).mean(dim=1)
    if kind == "sum":
        return h.pow(2).sum(dim=1)
    raise ValueError(f"unknown goodness {kind!r} (expected 'mean' or 'sum')")


def threshold_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float) -> torch.Tensor:
    """Hinton's loss: softplus(theta - g_pos) and softplus(g_neg - theta), averaged over both. -> ()"""
    return 0.5 * (F.softplus(threshold - g_pos).mean() + F.softplus(g_neg - threshold).mean())


def symba_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """SymBa (Lee & Song, 2023): softplus(-alpha * (g_pos - g_neg)), paired row by row. -> ()"""
    return F.softplus(-alpha * (g_pos - g_neg)).mean()


def peer_loss(running_mean: torch.Tensor) -> torch.Tensor:
    """Peer normalization: pull every unit's mean activity towards the layer's average. (H,) -> ()"""
    return (running_mean.mean() - running_mean).pow(2).mean()


def overlay(x: torch.Tensor, labels: torch.Tensor | None, num_classes: int, value: float = 1.0) -> torch.Tensor:
    """Write a one-hot label into the first C inputs of each flattened row (a copy; x is untouched).

    labels=None writes the neutral label, value / C in every one of the C slots.
    (B, D), (B,) -> (B, D)
    """
    out = x.clone()
    if labels is None:
        out[:, :num_classes] = value / num_classes
    else:
        out[:, :num_classes] = F.one_hot(labels, num_classes).to(x.dtype) * value
    return out


def overlay_all_labels(x: torch.Tensor, num_classes: int, value: float = 1.0) -> torch.Tensor:
    """Every row with every candidate label, label-major within a row. (B, D) -> (B*C, D)"""
    b = x.shape[0]
    labels = torch.arange(num_classes, device=x.device).repeat(b)  # (B*C,) 0..C-1, 0..C-1, ...
    return overlay(x.repeat_interleave(num_classes, dim=0), labels, num_classes, value)


def random_wrong_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A label drawn uniformly from the C-1 wrong ones, for every row. (B,) -> (B,)"""
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    return (labels + offset) % num_classes


def hard_wrong_labels(
    scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A wrong label sampled in proportion to the network's current belief, softmax(scores).

    The true label gets probability zero, so the result never equals it. (B, C), (B,) -> (B,)
    """
    probs = torch.softmax(scores.float(), dim=1)
    probs = probs.scatter(1, labels[:, None], 0.0)
    # A row whose belief sits entirely on the true label falls back to uniform over the wrong ones.
    empty = probs.sum(dim=1, keepdim=True) <= 0
    probs = torch.where(empty, torch.ones_like(probs).scatter(1, labels[:, None], 0.0), probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def lr_factor(epoch: int, epochs: int, schedule: str) -> float:
    """Learning-rate multiplier at the start of `epoch` (0-based) of `epochs`.

    "constant": 1.
    "linear-half": 1 for the first half, then linear decay towards 0 (Hinton's recipe).
    "cosine": half a cosine from 1 to 0 over the run.
    """
    if schedule == "constant" or epochs <= 1:
        return 1.0
    if schedule == "linear-half":
        half = epochs / 2
        return 1.0 if epoch < half else max(0.0, 2.0 * (epochs - epoch) / epochs)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"unknown lr schedule {schedule!r} (expected 'constant', 'linear-half' or 'cosine')")
