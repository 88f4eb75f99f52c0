"""A stack of FF layers with input preparation, a linear readout and batched prediction.

Used whole by the in-process trainer and by evaluation; the pipeline splits it into its layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ffpipe import ff
from ffpipe.config import RunConfig
from ffpipe.data import equalize
from ffpipe.layer import build_layer, check_net, step_if_finite


MAX_WHITENED = 4096  # the most inputs ZCA whitening takes: its matrix is D x D (CIFAR-10's 3,072: 38 MB)


def prepare_inputs(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, standardize: bool,
                   equalized: bool = False, whiten: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 images to flat float inputs in [0, 1], optionally equalized per image, standardized per channel and
    ZCA-whitened (`whiten`: the (center, matrix) of `fit_whitening`). (B, C, H, W) -> (B, D)"""
    if equalized:
        images = equalize(images)
    x = images.to(mean.device, torch.float32).div_(255)
    if standardize:
        x = (x - mean[:, None, None]) / std[:, None, None]
    x = x.flatten(1)
    if whiten is not None:
        center, matrix = whiten
        x = (x - center) @ matrix  # (B, D) @ (D, D): symmetric, so rows or columns alike
    return x


def fit_whitening(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, standardize: bool, equalized: bool,
                  eps: float, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """ZCA whitening fitted on `images` (the training split), prepared as `prepare_inputs` prepares them:
    (center (D,), matrix (D, D)) with matrix = U diag(1 / sqrt(s + eps)) U^T for the covariance's eigenpairs (s, U).
    Inputs become decorrelated, each direction scaled to unit variance, the image kept in place (ZCA, not PCA:
    the nearest whitened image to the original, so a local layer still sees local structure). `eps`, in units of
    the prepared inputs' variance (about 1 per pixel with --standardize), damps the directions of least variance,
    which are mostly pixel noise. The covariance is summed in float64 over chunks of centred float32 rows."""
    n = len(images)
    d = images[0].numel()
    if n < 2:
        raise ValueError(f"ZCA whitening needs at least 2 training images, not {n}")
    if d > MAX_WHITENED:
        raise ValueError(f"--whiten takes at most {MAX_WHITENED:,} inputs (its matrix is D x D); this data has {d:,}")
    rows = lambda i: prepare_inputs(images[i : i + chunk], mean, std, standardize, equalized)  # noqa: E731
    center = sum(rows(i).double().sum(dim=0) for i in range(0, n, chunk)) / n  # (D,)
    center = center.float()
    cov = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, chunk):
        x = rows(i) - center
        cov += (x.T @ x).double()
    s, u = torch.linalg.eigh(cov / (n - 1))
    matrix = (u * (s.clamp_min(0) + eps).rsqrt()) @ u.T
    return center, matrix.float()


def label_value(x: torch.Tensor, value: float | None) -> float:
    """The value written into the label slots: fixed, or (None) the batch's largest input."""
    return float(x.max()) if value is None else value


class FFNet(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, cfg: RunConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        c, h, w = in_shape
        shapes = check_net(cfg.layers, in_shape, num_classes, cfg.competitive)
        self.widths = [math.prod(out) for _, _, out in shapes]
        self.layers = nn.ModuleList(
            build_layer(k, spec, shape, cfg.layer, cfg.seed, num_classes) for k, (spec, shape, _) in enumerate(shapes)
        )
        self.readout = nn.Linear(sum(self._readout_widths()), num_classes, bias=False)
        nn.init.zeros_(self.readout.weight)
        # Per-channel input statistics, set by the trainer from the training data when cfg.standardize.
        self.register_buffer("input_mean", torch.zeros(c))
        self.register_buffer("input_std", torch.ones(c))
        if cfg.whiten:  # ZCA whitening (`fit_whitening`), set by the trainer from the training data
            d = c * h * w
            self.register_buffer("whiten_center", torch.zeros(d))
            self.register_buffer("whiten_matrix", torch.eye(d))

    def _readout_widths(self) -> list[int]:
        return self.widths[self.cfg.first_readout :]

    @property
    def first_scored(self) -> int:
        return self.cfg.first_scored

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images to flat float inputs. (B, C, H, W) -> (B, D)"""
        whiten = (self.whiten_center, self.whiten_matrix) if self.cfg.whiten else None
        return prepare_inputs(images, self.input_mean, self.input_std, self.cfg.standardize, self.cfg.equalize, whiten)

    def label_value(self, x: torch.Tensor) -> float:
        return label_value(x, self.cfg.label_value)

    def activities(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output for already-overlaid inputs. (B, D) -> [(B, H_l)]"""
        acts = []
        for layer in self.layers:
            x = layer(x)
            acts.append(x)
        return acts

    def readout_features(self, acts: list[torch.Tensor]) -> torch.Tensor:
        """Normalized activities of the scored layers, side by side. -> (B, sum H)"""
        return torch.cat([ff.normalize(a, self.cfg.layer.norm) for a in acts[self.cfg.first_readout :]], dim=1)

    @torch.no_grad()
    def neutral_logits(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """One pass with the neutral label, then the linear readout. (B, D) -> (B, C)
        The competitive loss writes no label in: its one pass is the plain images'."""
        acts = self.activities(x if self.cfg.competitive else ff.overlay(x, None, self.num_classes, value))
        return self.readout(self.readout_features(acts))

    @torch.no_grad()
    def label_goodness(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """Goodness of every candidate label, summed over the scored layers. (B, D) -> (B, C)
        The competitive loss needs one pass: each layer's class groups give every label's goodness at once."""
        b, c = x.shape[0], self.num_classes
        if self.cfg.competitive:
            return self._class_goodness(self.activities(x))
        acts = self.activities(ff.overlay_all_labels(x, c, value))  # [(B*C, H)]
        total = sum(layer.goodness(a) for layer, a in list(zip(self.layers, acts, strict=True))[self.first_scored :])
        return total.view(b, c)

    def _class_goodness(self, acts: list[torch.Tensor]) -> torch.Tensor:
        """The competitive loss's class goodness, summed over the scored layers. -> (B, C)"""
        return sum(layer.class_goodness(a) for layer, a in list(zip(self.layers, acts, strict=True))[self.first_scored :])

    @torch.no_grad()
    def scores(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Per-class scores for flat inputs; argmax is the prediction. (B, D) -> (B, C)
        mode "both" (evaluation only): the readout's and the goodness's log-softmax added, the product of the two's
        class probabilities (with the competitive loss, the layers are trained to give softmax(goodness) that sense)."""
        value = self.label_value(x)
        mode = mode or self.cfg.predict
        if mode == "both":  # the competitive loss (check_predict): one pass of the plain images gives both scores
            acts = self.activities(x)
            return F.log_softmax(self.readout(self.readout_features(acts)), 1) + F.log_softmax(self._class_goodness(acts), 1)
        if mode == "readout":
            return self.neutral_logits(x, value)
        return self.label_goodness(x, value)


def readout_step(readout: nn.Module, optimizer: torch.optim.Optimizer, features: torch.Tensor, labels: torch.Tensor,
                 read_after: bool = True) -> torch.Tensor:
    """One step of the linear readout (the in-process net's, or the sink's) on detached FF activities (no gradient
    reaches the FF layers). Refuses a non-finite loss with nothing changed (`NonFiniteLoss`, `step_if_finite`)."""
    logits = readout(features.detach())
    loss = F.cross_entropy(logits, labels)
    step_if_finite(optimizer, loss, "the readout's loss is not finite: the layers' outputs hold NaN or Inf (diverged? a lower --lr may help)",
                   read_after)
    return logits.detach()


@torch.no_grad()
def evaluate(net: FFNet, images: torch.Tensor, labels: torch.Tensor, mode: str | None = None, batch_size: int = 1000,
             tta_flip: bool = False) -> dict:
    """Accuracy and predictions over a whole split, in batches. Returns {"accuracy", "predictions"}.
    tta_flip: each image's scores plus its mirror image's (left-right), for datasets where a flip keeps the label."""
    if tta_flip and images.dim() != 4:
        raise ValueError(f"flipping needs images (N, C, H, W), not a {tuple(images.shape)} tensor")
    preds = []
    for i in range(0, len(labels), batch_size):
        batch = images[i : i + batch_size]
        scores = net.scores(net.inputs(batch), mode)
        if tta_flip:
            scores = scores + net.scores(net.inputs(batch.flip(-1)), mode)
        preds.append(scores.argmax(dim=1).cpu())
    predictions = torch.cat(preds)
    return {"accuracy": (predictions == labels).float().mean().item(), "predictions": predictions}
