"""One Forward-Forward layer and its local update. Knows nothing of datasets, processes or sockets.

The same `FFLayer` and `local_update` serve the in-process trainer (all layers in one loop) and
the pipeline's layer worker (one layer per process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ffpipe import ff
from ffpipe.config import LayerConfig, OptimConfig


class _ReLUFullGrad(torch.autograd.Function):
    """ReLU forward, identity backward: units that are off still learn (loeweX's reimplementation)."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad


class FFLayer(nn.Module):
    """h = relu(W · normalize(x) + b), trained by its own goodness objective."""

    def __init__(self, in_features: int, out_features: int, cfg: LayerConfig):
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(in_features, out_features)
        if cfg.init == "normal":
            nn.init.normal_(self.linear.weight, mean=0.0, std=1.0 / math.sqrt(out_features))
            nn.init.zeros_(self.linear.bias)
        # Running mean activity of each unit on positive data, for peer normalization.
        self.register_buffer("running_mean", torch.full((out_features,), 0.5))

    @property
    def threshold(self) -> float:
        """The goodness threshold: per unit for mean goodness, times the width for sum goodness."""
        scale = self.linear.out_features if self.cfg.goodness == "sum" else 1
        return self.cfg.threshold * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, D_in) -> (B, H)
        z = self.linear(ff.normalize(x, self.cfg.norm))
        return _ReLUFullGrad.apply(z) if self.cfg.relu_grad == "full" else torch.relu(z)

    def goodness(self, h: torch.Tensor) -> torch.Tensor:
        return ff.goodness(h, self.cfg.goodness)  # (B, H) -> (B,)

    def objective(self, h_pos: torch.Tensor, h_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's local loss; also returns the goodness of positives and negatives. Updates the peer-norm mean."""
        g_pos, g_neg = self.goodness(h_pos), self.goodness(h_neg)
        if self.cfg.loss == "symba":
            loss = ff.symba_loss(g_pos, g_neg, self.cfg.symba_alpha)
        else:
            loss = ff.threshold_loss(g_pos, g_neg, self.threshold)
        if self.cfg.peer_norm > 0:
            m = self.cfg.peer_momentum
            running = self.running_mean.detach() * m + h_pos.mean(dim=0) * (1 - m)  # (H,), grad through this batch
            loss = loss + self.cfg.peer_norm * ff.peer_loss(running)
            self.running_mean.copy_(running.detach())
        return loss, g_pos, g_neg


def make_layer(index: int, in_features: int, out_features: int, cfg: LayerConfig, seed: int) -> FFLayer:
    """Layer `index` initialized from (seed, index) alone, so a worker that holds only this layer builds
    exactly the weights the in-process trainer builds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + index)
        return FFLayer(in_features, out_features, cfg)


@dataclass
class StepResult:
    h_pos: torch.Tensor  # (B, H) detached outputs, the next layer's inputs
    h_neg: torch.Tensor
    loss: torch.Tensor  # () detached; call .item() only when logging (it syncs a GPU)
    g_pos: torch.Tensor  # () mean goodness of positives in this batch
    g_neg: torch.Tensor


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The layer's own optimizer, built outside the layer."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r} (expected 'adam' or 'sgd')")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def local_update(layer: FFLayer, optimizer: torch.optim.Optimizer, x_pos: torch.Tensor, x_neg: torch.Tensor) -> StepResult:
    """One optimizer step on this layer alone, then its detached outputs. Nothing else is kept."""
    b = x_pos.shape[0]
    h = layer(torch.cat([x_pos, x_neg]))  # (2B, H): one matmul for both halves
    h_pos, h_neg = h[:b], h[b:]
    loss, g_pos, g_neg = layer.objective(h_pos, h_neg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    h = h.detach()
    return StepResult(h[:b], h[b:], loss.detach(), g_pos.detach().mean(), g_neg.detach().mean())
