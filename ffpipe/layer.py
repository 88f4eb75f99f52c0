"""Forward-Forward layers, the registry of layer kinds, and the local update. Knows nothing of datasets,
processes or sockets.

The same layers and `local_update` serve the in-process trainer (all layers in one loop) and the
pipeline's layer worker (one layer per process). Every layer maps flat rows to flat rows, (B, D_in) ->
(B, D_out), so the wire and the trainers never care what kind of layer they hold. Kinds (`LAYER_KINDS`):

  500           fully connected, 500 ReLU units (`FFLayer`)
  conv64k3p2    convolution: 64 channels, 3x3 kernel, stride 1, "same" padding, then 2x2 max pooling
  lc32k5s2      locally connected (a convolution without weight sharing): 32 channels, 5x5, stride 2

The image kinds see their flat input as (C, H, W). The first one in a net also reads the label that
`ff.overlay` wrote into the first C inputs, blanks those inputs, and adds a learned label bias to its
units: per channel for a convolution, per unit for a locally connected layer. For a fully connected
layer the one-hot overlay already is exactly such a per-unit bias (one weight column per label).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


class _Contiguous(torch.autograd.Function):
    """x.contiguous() whose backward also hands back a contiguous gradient: bmm's backward on CPU copies a
    strided gradient matrix by matrix, and the gradient that comes back through a permute is strided."""

    @staticmethod
    def forward(ctx, x):
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def set_compute(threads: int) -> None:
    """How a process that trains layers sets torch up: `threads` intra-op threads, and subnormal floats flushed
    to zero on the CPU (FTZ/DAZ; CUDA is not affected). Without the flush, a convolutional layer's weights and Adam
    state drift into subnormals over a long run and its step slows down tenfold: 1.8-2.5 s instead of 0.11-0.25 s
    for the FER2013 net's second layer after 15 epochs, the same checkpoint stepped both ways. Only values below
    1.2e-38 are affected. The flush holds for the calling thread, which runs every kernel at one thread (the
    pipeline's default); torch's other intra-op threads, with `threads` > 1, keep subnormals."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


_SPEC = re.compile(r"^(?:(\d+)|(conv|lc)(\d+)(?:k(\d+))?(?:s(\d+))?(?:p(\d+))?)$")


MAX_UNITS = 1 << 20  # the widest layer (or most channels) a spec may ask for


@dataclass(frozen=True)
class LayerSpec:
    """One entry of `--layers`: "500" (fully connected), "conv64k3p2", "lc32k5s2" (see the module doc)."""

    kind: str  # "fc", "conv" or "lc"
    units: int  # fc: width; conv, lc: output channels
    kernel: int = 3
    stride: int = 1
    pool: int = 1

    @classmethod
    def parse(cls, spec: int | str) -> LayerSpec:
        m = _SPEC.match(str(spec).strip().lower())
        if m is None:
            raise ValueError(f"layer {spec!r} is not a width (500) or an image layer such as conv64k3p2 or lc32k5s2")
        if m.group(1):
            units, kind, kernel, stride, pool = int(m.group(1)), "fc", 1, 1, 1
        else:
            kind, units = m.group(2), int(m.group(3))
            kernel, stride, pool = (int(g) if g else d for g, d in zip(m.group(4, 5, 6), (3, 1, 1), strict=True))
        if min(units, kernel, stride, pool) <= 0:
            raise ValueError(f"layer {spec!r}: sizes must be positive")
        if units > MAX_UNITS:
            raise ValueError(f"layer {spec!r}: at most {MAX_UNITS:,} {'units' if kind == 'fc' else 'channels'}")
        return cls(kind, units, kernel, stride, pool)

    @property
    def image(self) -> bool:
        return self.kind != "fc"

    def conv_shape(self, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(C', H'', W'') of the local map before pooling."""
        _, h, w = in_shape
        pad = self.kernel // 2
        return self.units, (h + 2 * pad - self.kernel) // self.stride + 1, (w + 2 * pad - self.kernel) // self.stride + 1

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self.image:
            return (self.units,)
        if len(in_shape) != 3:
            raise ValueError(f"layer {self}: an image layer needs an image (C, H, W) input, not {tuple(in_shape)}")
        c, h, w = self.conv_shape(in_shape)
        if h // self.pool < 1 or w // self.pool < 1:
            raise ValueError(f"layer {self}: a {in_shape[1]}x{in_shape[2]} input is too small")
        return c, h // self.pool, w // self.pool

    def macs(self, in_shape: tuple[int, ...]) -> int:
        """Multiply-adds of one image's pass through the layer: what its step costs, up to a constant factor."""
        if not self.image:
            return math.prod(in_shape) * self.units
        c, h, w = self.conv_shape(in_shape)
        return c * h * w * self.kernel**2 * in_shape[0]

    def __str__(self) -> str:
        if not self.image:
            return str(self.units)
        return f"{self.kind}{self.units}k{self.kernel}" + (f"s{self.stride}" if self.stride > 1 else "") + (f"p{self.pool}" if self.pool > 1 else "")


def plan(layers, in_shape: tuple[int, ...]) -> list[tuple[LayerSpec, tuple[int, ...], tuple[int, ...]]]:
    """(spec, input shape, output shape) of every layer, for inputs of `in_shape`: (C, H, W), or (D,) for flat
    inputs when the net is fully connected."""
    out, shape = [], tuple(in_shape)
    for spec in map(LayerSpec.parse, layers):
        nxt = spec.out_shape(shape)
        out.append((spec, shape, nxt))
        shape = nxt
    return out


def check_channels(channels: int, num_classes: int) -> None:
    if channels < num_classes:
        raise ValueError(f"the competitive loss needs at least one channel per class: {channels} < {num_classes}")


def check_net(layers, in_shape: tuple[int, ...], num_classes: int, competitive: bool):
    """`plan(layers, in_shape)`, or ValueError for whatever building that net would refuse: inputs too small for
    the label overlay or for a layer, and with the competitive loss a layer with fewer channels than classes.
    The in-process net calls it before it builds anything, the pipeline's launcher before it starts a process."""
    if math.prod(in_shape) <= num_classes:
        raise ValueError(f"inputs of {math.prod(in_shape)} features cannot hold a {num_classes}-class label overlay")
    shapes = plan(layers, in_shape)
    if competitive:
        for spec, _, _ in shapes:
            check_channels(spec.units, num_classes)  # a layer's channels: a unit or an image channel each
    return shapes


def out_widths(layers, in_shape: tuple[int, ...] | None) -> list[int]:
    """Every layer's flat output width. A fully connected net needs no input shape."""
    specs = [LayerSpec.parse(s) for s in layers]
    if in_shape is None:
        if any(s.image for s in specs):
            raise ValueError("a net with image layers needs the input's (C, H, W) to size them")
        return [s.units for s in specs]
    return [math.prod(o) for _, _, o in plan(layers, in_shape)]


RESUME_OLD_LAYOUT = ("written by an earlier ffpipe whose locally connected layers ordered their inputs (channel, row, "
                     "column): its weights load (reordered) for eval and predict, but its optimizer state does not fit them; "
                     "start a fresh run")


class NonFiniteLoss(ValueError):
    """A layer's (or a readout's) loss on a batch is NaN or infinite; nothing was changed (`step_if_finite`). A NaN
    or an Inf anywhere in a batch's inputs reaches the loss: normalizing makes the whole row NaN (`ff.normalize`),
    every unit reads some of its row, and products, sums, ReLU and max pooling pass NaN on; so this check, on one
    number, stands in for a pass over the inputs."""


class Diverged(Exception):
    """A pipeline layer's (or the sink's readout's) loss is not finite on finite inputs: it has diverged, every batch
    would be refused and sent again for ever, so the role stops with this message (not a ValueError: the roles
    count those as bad messages and go on)."""


class _FFBase(nn.Module):
    """What every FF layer shares: goodness, threshold and the local objective over its flat outputs."""

    in_features: int
    out_features: int
    resumable = True  # False once it loaded weights from a checkpoint whose optimizer state would not fit them

    def __init__(self, in_features: int, out_features: int, cfg: LayerConfig):
        super().__init__()
        self.cfg, self.in_features, self.out_features = cfg, in_features, out_features
        # Running mean activity of each unit on positive data, for peer normalization.
        self.register_buffer("running_mean", torch.full((out_features,), 0.5))

    @property
    def threshold(self) -> float:
        """The goodness threshold: per unit for mean goodness, times the width for sum goodness."""
        scale = self.out_features if self.cfg.goodness == "sum" else 1
        return self.cfg.threshold * scale

    def _relu(self, z: torch.Tensor) -> torch.Tensor:
        return _ReLUFullGrad.apply(z) if self.cfg.relu_grad == "full" else torch.relu(z)

    def goodness(self, h: torch.Tensor) -> torch.Tensor:
        return ff.goodness(h, self.cfg.goodness)  # (B, H) -> (B,)

    channels: int  # units that share a class group: fully connected, every unit; image layers, every channel

    def set_classes(self, num_classes: int) -> None:
        """For the competitive loss: channel k belongs to class k mod C; `groups` averages each class's channels."""
        check_channels(self.channels, num_classes)
        owner = torch.arange(self.channels) % num_classes
        groups = F.one_hot(owner, num_classes).float()
        self.register_buffer("groups", groups / groups.sum(dim=0), persistent=False)  # (channels, C)

    def class_goodness(self, h: torch.Tensor) -> torch.Tensor:
        """Mean squared activity of each class's channels. (B, D_out) -> (B, C)"""
        per_channel = h.view(h.shape[0], self.channels, -1).pow(2).mean(dim=2)  # (B, channels)
        return per_channel @ self.groups

    def objective(self, h_pos: torch.Tensor, h_neg: torch.Tensor | None, labels: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's local loss; also returns the goodness of positives and negatives. Updates the peer-norm mean.
        The competitive loss takes the labels instead of negatives; its "negative goodness" is the wrong classes'."""
        if self.cfg.loss == "competitive":
            g = self.class_goodness(h_pos)  # (B, C)
            loss = F.cross_entropy(g, labels)
            true = F.one_hot(labels, g.shape[1]).bool()
            g_pos, g_neg = g[true], g[~true]
        else:
            g_pos, g_neg = self.goodness(h_pos), self.goodness(h_neg)
            if self.cfg.loss == "symba":
                loss = ff.symba_loss(g_pos, g_neg, self.cfg.symba_alpha)
            else:
                loss = ff.threshold_loss(g_pos, g_neg, self.threshold)
        if self.cfg.peer_norm > 0:
            m = self.cfg.peer_momentum
            running = self.running_mean.detach() * m + h_pos.mean(dim=0) * (1 - m)  # (H,), grad through this batch
            loss = loss + self.cfg.peer_norm * ff.peer_loss(running)
            # kept only if the whole loss is finite (a batch `step_if_finite` refuses changes nothing), without
            # reading the loss here: on a GPU that would stall the step
            self.running_mean.copy_(torch.where(torch.isfinite(loss), running.detach(), self.running_mean))
        return loss, g_pos, g_neg


class FFLayer(_FFBase):
    """h = relu(W · normalize(x) + b), trained by its own goodness objective."""

    def __init__(self, in_features: int, out_features: int, cfg: LayerConfig):
        super().__init__(in_features, out_features, cfg)
        self.channels = out_features
        self.linear = nn.Linear(in_features, out_features)
        if cfg.init == "normal":
            nn.init.normal_(self.linear.weight, mean=0.0, std=1.0 / math.sqrt(out_features))
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, D_in) -> (B, H)
        return self._relu(self.linear(ff.normalize(x, self.cfg.norm)))


class _ImageFFLayer(_FFBase):
    """An FF layer over images: normalize the whole input, local linear map, label bias, ReLU, max pooling.

    Flat in, flat out: (B, C*H*W) -> (B, C'*H'*W')."""

    def __init__(self, spec: LayerSpec, in_shape: tuple[int, int, int], cfg: LayerConfig, label_classes: int):
        out_shape = spec.out_shape(in_shape)
        super().__init__(math.prod(in_shape), math.prod(out_shape), cfg)
        self.spec, self.in_shape, self.out_shape, self.channels = spec, tuple(in_shape), out_shape, spec.units
        self.label_classes = label_classes
        if label_classes >= self.in_features:
            raise ValueError(f"inputs of {self.in_features} features cannot hold a {label_classes}-class label overlay")
        if label_classes:
            mask = torch.ones(self.in_features)
            mask[:label_classes] = 0  # the overlay's label slots are not image
            self.register_buffer("image_mask", mask, persistent=False)

    def _label_bias(self, label: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pool_flat(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C', H'', W'') -> (B, C'*H'*W'): max pooling, then the flat rows the next layer reads."""
        if self.spec.pool > 1:
            h = F.max_pool2d(h, self.spec.pool)
        return h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        label = None
        if self.label_classes:
            label, x = x[:, : self.label_classes], x * self.image_mask
        z = self._local(ff.normalize(x, self.cfg.norm).view(b, *self.in_shape))  # (B, C', H'', W''), or as _local lays it out
        if label is not None:
            z = z + self._label_bias(label)
        return self._pool_flat(self._relu(z))


class ConvFFLayer(_ImageFFLayer):
    """A convolutional FF block: weights shared over positions, a label bias per channel."""

    def __init__(self, spec: LayerSpec, in_shape: tuple[int, int, int], cfg: LayerConfig, label_classes: int = 0):
        super().__init__(spec, in_shape, cfg, label_classes)
        c = in_shape[0]
        self.conv = nn.Conv2d(c, spec.units, spec.kernel, spec.stride, padding=spec.kernel // 2)
        if cfg.init == "normal":
            nn.init.normal_(self.conv.weight, mean=0.0, std=1.0 / math.sqrt(c * spec.kernel**2))
            nn.init.zeros_(self.conv.bias)
        if label_classes:
            self.label = nn.Parameter(torch.randn(label_classes, spec.units))

    def _local(self, x):
        return self.conv(x)

    def _label_bias(self, label):
        return (label @ self.label)[:, :, None, None]  # (B, K) @ (K, C') -> (B, C', 1, 1)


class LocalFFLayer(_ImageFFLayer):
    """A locally connected FF layer (Hinton's CIFAR-10 nets): every position has its own filter and label bias."""

    def __init__(self, spec: LayerSpec, in_shape: tuple[int, int, int], cfg: LayerConfig, label_classes: int = 0):
        super().__init__(spec, in_shape, cfg, label_classes)
        c, k = in_shape[0], spec.kernel
        self.grid = spec.conv_shape(in_shape)[1:]  # (H'', W'') before pooling
        positions, fan_in = math.prod(self.grid), c * k * k
        # one (k*k*C, C') filter per position, its inputs ordered (row, column, channel): a patch is then k*k runs of
        # C contiguous floats, copied from a (H, W, B, C) input. Named apart from the earlier layout's `weight`
        # (inputs ordered (channel, row, column), as F.unfold gives them), which _load_from_state_dict reorders.
        self.filters = nn.Parameter(torch.randn(positions, fan_in, spec.units) / math.sqrt(fan_in))
        self.bias = nn.Parameter(torch.zeros(spec.units, *self.grid))
        if label_classes:
            self.label = nn.Parameter(torch.randn(label_classes, spec.units, *self.grid))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Reads a checkpoint from before the (row, column, channel) layout too: its `weight`, inputs ordered
        (channel, row, column), reordered into `filters`. Its optimizer state is not: `resumable` turns False."""
        old = state_dict.pop(prefix + "weight", None)
        if old is not None and prefix + "filters" not in state_dict and old.dim() == 3:
            k, (p, f, o) = self.spec.kernel, old.shape
            state_dict[prefix + "filters"] = old.reshape(p, f // (k * k), k, k, o).permute(0, 2, 3, 1, 4).reshape(p, f, o)
            self.resumable = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _local(self, x):
        (k, s), (b, c), (ho, wo) = (self.spec.kernel, self.spec.stride), x.shape[:2], self.grid
        p = k // 2
        padded = F.pad(x.permute(2, 3, 0, 1), (0, 0, 0, 0, p, p, p, p))  # (H+2p, W+2p, B, C)
        # the patches as (P, B, k*k*C), built by k*k strided slice copies: 3-7x faster than F.unfold's (B, C*k*k, P)
        # transposed into this layout, which the batched matmul needs contiguous (bmm on CPU copies strided operands
        # position by position, its gradient's included)
        patches = x.new_empty(ho, wo, b, k, k, c)
        for i in range(k):
            for j in range(k):
                patches[:, :, :, i, j] = padded[i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s]
        z = _Contiguous.apply(torch.bmm(patches.view(ho * wo, b, k * k * c), self.filters))  # (P, B, C')
        # kept in this (H'', W'', B, C') layout through bias, ReLU and pooling: permuting it to (B, C', H'', W'')
        # first made each of them a slow strided pass
        return z.view(ho, wo, b, self.spec.units) + self.bias.permute(1, 2, 0).unsqueeze(2)

    def _label_bias(self, label):
        return torch.einsum("bk,kohw->hwbo", label, self.label)  # (H'', W'', B, C'), as _local lays out

    def _pool_flat(self, h):
        b = h.shape[2]
        if self.spec.pool > 1:
            # one copy to (B, H'', W'', C'), a channels-last (B, C', H'', W'') image, for max_pool2d's channels-last
            # kernel; pooling the (H'', W'', B, C') layout in place was slower (it is not a layout torch's kernels know)
            h = F.max_pool2d(h.permute(2, 0, 1, 3).contiguous().permute(0, 3, 1, 2), self.spec.pool)
        else:
            h = h.permute(2, 3, 0, 1)
        return h.reshape(b, -1)  # (B, C'*H'*W'), channel-major like every image layer's rows


def make_layer(index: int, in_features: int, out_features: int, cfg: LayerConfig, seed: int) -> FFLayer:
    """Layer `index` initialized from (seed, index) alone, so a worker that holds only this layer builds
    exactly the weights the in-process trainer builds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + index)
        return FFLayer(in_features, out_features, cfg)


LAYER_KINDS = {"fc": FFLayer, "conv": ConvFFLayer, "lc": LocalFFLayer}


def build_layer(index: int, spec: int | str | LayerSpec, in_shape: tuple[int, ...], cfg: LayerConfig, seed: int,
                num_classes: int = 0) -> _FFBase:
    """Layer `index` of any kind, initialized from (seed, index) alone. An image layer at index 0 reads the
    label from the first `num_classes` inputs (not with the competitive loss, which overlays no label).
    The seed goes to torch's process-wide generator (inside fork_rng): another thread drawing from it
    meanwhile changes the weights, so build layers where no other thread draws (a worker process does)."""
    spec = spec if isinstance(spec, LayerSpec) else LayerSpec.parse(spec)
    competitive = cfg.loss == "competitive"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + index)
        if spec.kind == "fc":
            layer = FFLayer(math.prod(in_shape), spec.units, cfg)
        else:
            layer = LAYER_KINDS[spec.kind](spec, tuple(in_shape), cfg, num_classes if index == 0 and not competitive else 0)
    if competitive:
        layer.set_classes(num_classes)
    return layer


@dataclass
class StepResult:
    h_pos: torch.Tensor  # (B, H) detached outputs, the next layer's inputs
    h_neg: torch.Tensor | None  # None for the competitive loss, which has no negatives
    loss: torch.Tensor  # () detached; call .item() only when logging (it syncs a GPU)
    g_pos: torch.Tensor  # () mean goodness of positives in this batch
    g_neg: torch.Tensor


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The layer's own optimizer, built outside the layer. torch's fused kernel where it has one (CPU and CUDA
    float parameters): one pass over each parameter per step, 2-9x faster on CPU than the default
    implementation's several full-size temporaries, the same update to float rounding."""
    params = list(params)
    fused = True if params and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) else None
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.name!r} (expected 'adam' or 'sgd')")


def warm_up_optimizers() -> None:
    """torch's first optimizer takes seconds to build (it imports torch's compiler then; 2-8 s on these cores): a
    role pays that at start-up, alongside the others, instead of stalling on its first batch with the pipeline
    waiting behind it (and the sink, stalled so, took its peers' queued heartbeats for silence)."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


# Device types where `step_if_finite` reads the loss before the step. Elsewhere (a GPU) reading it there would stall
# every step, so a fused optimizer skips the step on the device instead. Tests empty it to run that path on the CPU.
READ_LOSS_FIRST = ("cpu",)


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can skip itself on the device when told the loss is not finite (`found_inf`, as
    torch's GradScaler tells it): torch's fused Adam and SGD can, except fused SGD with momentum before its buffers
    exist (a skipped first step leaves the new buffers uninitialised, torch 2.14: the next step then reads garbage)."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            return False
        if group.get("momentum") and any("momentum_buffer" not in optimizer.state.get(p, {}) for p in group["params"]):
            return False
    return True


def step_if_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor, refusal: str, read_after: bool = True) -> None:
    """zero_grad, backward and step, unless the loss is NaN or infinite: then `NonFiniteLoss(refusal)`, with the
    parameters and the optimizer's state as they were. On the CPU the loss is read before the backward pass. On a
    GPU that read would stall the step (a host sync between backward and step), so the fused optimizer is told to
    skip the step on the device (`found_inf`, whose skip also sets Adam's step count back) and the loss is read
    after it, when the device is done anyway (a pipeline worker reads the loss for its metrics then). With
    `read_after=False` not even then: the skipped step is counted on the device, and the caller reads the count
    (`skipped_steps`) when it syncs anyway, and must before it saves or reports anything."""
    finite = torch.isfinite(loss)
    on_device = loss.device.type not in READ_LOSS_FIRST and _skips_on_device(optimizer)
    if not on_device and not finite:
        raise NonFiniteLoss(refusal)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.found_inf = (~finite).float() if on_device else None  # never a stale one from an earlier step
    optimizer.step()
    if on_device and read_after and not finite:
        raise NonFiniteLoss(refusal)
    if on_device and not read_after:
        optimizer.skipped = getattr(optimizer, "skipped", 0) + optimizer.found_inf  # a device tensor: no sync


def skipped_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many steps `step_if_finite(..., read_after=False)` skipped on the device since the last call (a host
    sync), and start counting again."""
    n, optimizer.skipped = getattr(optimizer, "skipped", 0), 0
    return int(n)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def local_update(layer: _FFBase, optimizer: torch.optim.Optimizer, x_pos: torch.Tensor, x_neg: torch.Tensor | None,
                 labels: torch.Tensor | None = None, read_after: bool = True) -> StepResult:
    """One optimizer step on this layer alone, then its detached outputs. Nothing else is kept.
    The competitive loss takes `labels` and no negatives (x_neg None). A non-finite loss: `step_if_finite`."""
    b = x_pos.shape[0]
    h = layer(x_pos if x_neg is None else torch.cat([x_pos, x_neg]))  # (2B, H): one matmul for both halves
    h_pos, h_neg = h[:b], (None if x_neg is None else h[b:])
    loss, g_pos, g_neg = layer.objective(h_pos, h_neg, labels)
    step_if_finite(optimizer, loss, "the loss is not finite: the batch holds NaN or Inf, or the layer has diverged", read_after)
    h = h.detach()
    return StepResult(h[:b], None if x_neg is None else h[b:], loss.detach(), g_pos.detach().mean(), g_neg.detach().mean())
