"""Frozen, validated configs and the named presets. Explicit CLI flags override a preset's fields.

Invalid settings raise `ValueError` with a message meant for the user.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

DATASETS = ("auto", "mnist", "fashion-mnist", "cifar10", "fer2013", "digits", "synthetic")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


MAX_THREADS = 1024  # torch threads per process: more only exhausts memory maps
MAX_EPOCHS = 1_000_000  # the seed recipe's 3000 with room to spare; beyond, a typo
MAX_BATCH = 1 << 20  # images per batch: more than any dataset here holds, and a batch this size is gigabytes
MAX_SHIFT = 64  # pixels; a run also refuses a shift of half its images' side or more


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LayerConfig:
    """The math of one FF layer."""

    norm: str = "rms"  # input normalization: "rms" (Hinton's code) or "l2" (the popular example)
    goodness: str = "sum"  # "sum" or "mean" of squared activities
    threshold: float = 1.0  # per unit: sum goodness is compared with threshold * width
    loss: str = "threshold"  # "threshold": softplus(theta - g_pos) + softplus(g_neg - theta); "symba"; "competitive"
    symba_alpha: float = 4.0  # SymBa's sharpness (loss = softplus(-alpha * (g_pos - g_neg)))
    peer_norm: float = 0.03  # weight of the peer-normalization loss (0 = off)
    peer_momentum: float = 0.9  # running mean of unit activity for peer normalization
    relu_grad: str = "full"  # "full": identity gradient through the ReLU (no dead units); "standard"
    init: str = "normal"  # "normal": N(0, 1/out_features); "torch": nn.Linear's default

    def __post_init__(self):
        _choice("norm", self.norm, ("rms", "l2"))
        _choice("goodness", self.goodness, ("sum", "mean"))
        _choice("loss", self.loss, ("threshold", "symba", "competitive"))
        _choice("relu_grad", self.relu_grad, ("full", "standard"))
        _choice("init", self.init, ("normal", "torch"))
        _positive("peer_norm", self.peer_norm, allow_zero=True)
        _positive("threshold", self.threshold, allow_zero=True)
        _positive("symba_alpha", self.symba_alpha)
        if not 0 <= self.peer_momentum < 1:
            raise ValueError(f"peer_momentum must be in [0, 1); got {self.peer_momentum}")


OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """A layer's (or the readout's) own optimizer and learning-rate schedule."""

    name: str = "sgd"  # "sgd" (with momentum) or "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 3e-4
    schedule: str = "linear-half"  # "constant", "linear-half" (decay over the second half), "cosine"

    def __post_init__(self):
        _choice("optimizer", self.name, OPTIMIZERS)
        _choice("lr schedule", self.schedule, ("constant", "linear-half", "cosine"))
        _positive("lr", self.lr)
        _positive("weight_decay", self.weight_decay, allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a training run needs. Build one with `preset(name, **overrides)`."""

    preset: str = "custom"
    # data
    dataset: str = "auto"  # "auto": MNIST if present or downloadable, else scikit-learn's 8x8 digits
    data_dir: str = "data"
    download: bool = True  # try torchvision's download when files are missing
    val_size: int = 0  # images held out from the end of the training set; 0 = evaluate on the test set
    train_size: int = 0  # train on only the first N training images (after the hold-out); 0 = all
    standardize: bool = False  # subtract the dataset mean and divide by its std (the popular example does)
    equalize: bool = False  # histogram-equalize every image first (train, test and `ffpipe predict` alike)
    whiten: float = 0.0  # ZCA-whiten the inputs (after standardize), fitted on the training images, with this
    #                      epsilon added to the covariance's eigenvalues (in units of an input's variance); 0 = off
    test_blur: float = 0.0  # sigma (pixels) of a Gaussian blur on test images and `ffpipe predict`'s, for a
    #                         training set that was blurred (FER2013's image-folder copy: about 3); 0 = off
    label_value: float | None = 1.0  # value written into the one-hot label slot; None = the batch's max pixel
    shift: int = 0  # augmentation: translate each training image by up to this many pixels (0 = off)
    flip: bool = False  # augmentation: mirror training images left-right at random (not for digits)
    # model
    layers: tuple[int | str, ...] = (1000, 1000, 1000)  # widths, or image layers such as "conv64k3p2" (ffpipe.layer)
    layer: LayerConfig = field(default_factory=LayerConfig)
    # training
    epochs: int = 60
    batch_size: int = 100
    schedule: str = "joint"  # "joint": every layer on every batch; "greedy": one layer after another
    negatives: str = "hard"  # "hard": wrong labels sampled from the network's belief; "random": uniform
    optim: OptimConfig = field(default_factory=OptimConfig)
    readout_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, weight_decay=3e-3))
    # prediction
    predict: str = "goodness"  # "goodness": argmax of per-label goodness; "readout": a linear readout of the layers'
    #                            normalized activities (after a neutral-label pass; the competitive loss's own pass)
    skip_first: bool = True  # leave the first hidden layer out of the goodness sum (Hinton does)
    score_last: bool = False  # only the last layer's goodness scores the labels (overrides skip_first)
    # machinery
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch threads; 0 = one per core
    eval_every: int = 1  # epochs between evaluations (0 = only at the end)
    log_every: int = 100  # batches between metrics.jsonl records
    checkpoint_every: int = 100  # pipeline: train batches between a layer's checkpoints (what a restart loses at most)
    retransmit_s: float = 10.0  # pipeline: the source resends what the sink has not confirmed after this long
    out: str = "runs/latest"

    def __post_init__(self):
        _choice("dataset", self.dataset, DATASETS)
        _choice("schedule", self.schedule, ("joint", "greedy"))
        _choice("negatives", self.negatives, ("hard", "random"))
        _choice("predict", self.predict, ("goodness", "readout"))
        if not self.layers:
            raise ValueError("layers must name at least one hidden layer, e.g. 500,500")
        from ffpipe.layer import LayerSpec  # the registry of layer kinds lives with the layers

        specs = [LayerSpec.parse(spec) for spec in self.layers]
        for before, after in pairwise(specs):
            if after.image and not before.image:
                raise ValueError(f"image layer {after} cannot follow the fully connected layer {before}: put image layers first")
        object.__setattr__(self, "layers", tuple(s.units if not s.image else str(s) for s in specs))
        if self.skip_first and not self.score_last and self.predict == "goodness" and len(self.layers) < 2:
            raise ValueError("skip_first needs at least two layers; pass --no-skip-first for a one-layer net")
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        for name, value, most in (("epochs", self.epochs, MAX_EPOCHS), ("batch_size", self.batch_size, MAX_BATCH), ("shift", self.shift, MAX_SHIFT)):
            if value > most:
                raise ValueError(f"{name} must be at most {most:,}; got {value!r}")
        _positive("val_size", self.val_size, allow_zero=True)
        _positive("train_size", self.train_size, allow_zero=True)
        _positive("shift", self.shift, allow_zero=True)
        _positive("test_blur", self.test_blur, allow_zero=True)
        _positive("whiten", self.whiten, allow_zero=True)
        _positive("threads", self.threads, allow_zero=True)
        if self.threads > MAX_THREADS:
            raise ValueError(f"threads must be at most {MAX_THREADS}; got {self.threads}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63); got {self.seed!r}")
        _positive("eval_every", self.eval_every, allow_zero=True)
        _positive("log_every", self.log_every)
        _positive("checkpoint_every", self.checkpoint_every)
        _positive("retransmit_s", self.retransmit_s)
        if self.schedule == "greedy" and self.uses_readout:
            raise ValueError("the greedy schedule trains no readout: use --negatives random and --predict goodness with it")
        try:
            import torch

            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device {self.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None

    @property
    def first_scored(self) -> int:
        """Index of the first layer whose goodness counts towards prediction."""
        if self.score_last:
            return len(self.layers) - 1
        return 1 if self.skip_first and len(self.layers) > 1 else 0

    @property
    def first_readout(self) -> int:
        """Index of the first layer whose activities feed the linear readout (all but the first)."""
        return 1 if len(self.layers) > 1 else 0

    @property
    def competitive(self) -> bool:
        """Channel-wise competitive FF: no label overlay and no negatives; each layer's units are split into one
        group per class, and a softmax over the groups' goodness is trained towards the true class."""
        return self.layer.loss == "competitive"

    @property
    def hard_negatives(self) -> bool:
        """Wrong labels drawn from the readout's belief (the competitive loss has no negatives to draw)."""
        return self.negatives == "hard" and not self.competitive

    @property
    def uses_readout(self) -> bool:
        """The linear readout is trained when it predicts or when it chooses the hard negatives."""
        return self.predict == "readout" or self.hard_negatives

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        d["layer"] = LayerConfig(**d["layer"])
        d["optim"] = OptimConfig(**d["optim"])
        d["readout_optim"] = OptimConfig(**d["readout_optim"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    def changed_from(self, saved: RunConfig | None, fields) -> dict:
        """The fields among `fields` ("layers", or a nested one such as "optim.name") where `saved` (what a
        checkpoint was made with) differs from this config, with saved's values: what a resume refuses to change."""
        mine, theirs = self.to_dict(), saved.to_dict() if saved is not None else {}

        def get(d: dict, key: str):
            for part in key.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d

        return {k: get(theirs, k) for k in dict.fromkeys(fields) if get(mine, k) != get(theirs, k)}


# Named presets: only the fields that differ from RunConfig's defaults.
PRESETS: dict[str, dict] = {
    # A real run in about a minute on two cores: the hinton recipe, smaller and shorter.
    "quick": dict(layers=(500, 500), epochs=5),
    # Hinton's supervised MNIST recipe as in his code and loeweX's reimplementation: RMS norm, sum goodness
    # with threshold = width, peer normalization, mini-batches of 100, every layer on every batch, SGD with
    # momentum and a linear lr decay over the second half, hard negatives from a linear readout.
    "hinton": dict(layers=(1000, 1000, 1000), epochs=60),
    # The popular PyTorch example the seed report used: 784-500-500, one full batch of 50,000 images, 1000
    # epochs per layer trained one layer after another, Adam lr 0.03, L2 norm, mean goodness, threshold 2.
    "seed": dict(
        dataset="mnist",
        layers=(500, 500),
        epochs=1000,
        batch_size=50_000,
        val_size=10_000,  # the example trains on the first 50,000 training images
        standardize=True,
        label_value=None,
        schedule="greedy",
        negatives="random",
        skip_first=False,
        layer=LayerConfig(norm="l2", goodness="mean", threshold=2.0, peer_norm=0.0, relu_grad="standard", init="torch"),
        optim=OptimConfig(name="adam", lr=0.03, weight_decay=0.0, schedule="constant"),
        eval_every=0,
        log_every=50,
    ),
}


# Per-dataset adjustments of a preset, applied before explicit overrides. The 1,797 8x8 digits are
# 40x smaller than MNIST, so the quick preset needs more epochs there to learn anything.
PRESET_DATASET_DEFAULTS: dict[tuple[str, str], dict] = {
    ("quick", "digits"): dict(epochs=40, batch_size=50),
    # The seed report ran the example on CIFAR-10 for 3000 epochs and on FER2013 for 1000, on the whole training
    # set (50,000 and 28,709 images: one full batch each), with nothing held out.
    ("seed", "cifar10"): dict(epochs=3000, val_size=0),
    ("seed", "fer2013"): dict(val_size=0),
}


def preset(name: str, **overrides) -> RunConfig:
    """The named preset with `overrides` applied (None values are ignored: they mean 'not given')."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    dataset = given.get("dataset", PRESETS[name].get("dataset"))
    fields = {**PRESETS[name], **PRESET_DATASET_DEFAULTS.get((name, dataset), {}), **given}
    return RunConfig(preset=name, **fields)


def apply(cfg: RunConfig, **overrides) -> RunConfig:
    """Replace top-level fields, ignoring None values."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, **given) if given else cfg


def override_nested(cfg: RunConfig, **groups: dict) -> RunConfig:
    """Replace fields of the nested configs (layer=..., optim=...), ignoring None values."""
    changes = {}
    for name, values in groups.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            changes[name] = dataclasses.replace(getattr(cfg, name), **given)
    return dataclasses.replace(cfg, **changes) if changes else cfg
