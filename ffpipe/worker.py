"""The layer worker role: one FF layer and its optimizer, on its own device.

Sockets: PULL, binds this layer's address (batches arrive from the source or the previous layer).
         PUSH, connects to the next layer or the sink (outputs leave at once).

Layer 0 receives each image once ("x", with its labels "y" and wrong labels "neg") and writes the labels in
itself, as the in-process trainer does; it also takes inputs with the labels already written in (x_pos, ...).
train: one local update (the same `local_update` the in-process trainer calls), forward the detached
       outputs; with a readout, also forward the neutral-label pass and append this layer's normalized
       activity to the features the message carries (the competitive loss: the outputs it just forwarded).
       Batches are applied in order, each at most once: the next batch number is applied; one already applied (the source resending) is only forwarded; one past
       a gap (batches lost with a crashed peer) is dropped and a small `gap` notice goes on to the sink,
       which asks the source to resend. Every `checkpoint_every` batches the layer checkpoints and
       reports the batch it holds durably in the scalars it forwards.
eval:  add this layer's goodness for every (image, label) to the accumulator the message carries; forward.
gap:   forwarded as it is.
stop:  checkpoint, add this layer's counts to the message, forward, exit.
Nothing is kept per batch. A malformed message is logged, counted and reported downstream at stop.
A NaN or an Inf is refused like any malformed message. The inputs of the update (x, x_pos, x_neg of a train
batch) are checked by its loss, which they reach (`NonFiniteLoss`, on a GPU without stalling the step: see
`layer.step_if_finite`), instead of by a pass of their own on decoding (a third of a wide layer's wire time);
every other tensor, and a batch only forwarded, on decoding.
"""

from __future__ import annotations

import math
import re
import resource
import signal
import time
from pathlib import Path

import torch

from ffpipe import checkpoint, ff, transport
from ffpipe.config import RunConfig
from ffpipe.layer import (RESUME_OLD_LAYOUT, Diverged, NonFiniteLoss, build_layer, local_update, make_optimizer, out_widths, plan,
                          set_compute, set_lr, warm_up_optimizers)
from ffpipe.metrics import PeakMemory
from ffpipe.model import label_value
from ffpipe.topology import Topology
from ffpipe.wire import Message, Rejections, WireError, check_finite, parse_shape

POLL_MS = 250  # how often a waiting worker checks for a stop signal
GAP_NOTICE_S = 0.5  # at most one gap notice per this many seconds
MAX_INPUT_FEATURES = 1 << 22  # layer 0 takes its width from the first batch; nothing wider is believable
MAX_CLASSES = 100_000
# what a layer's weights are made with: a resumed layer refuses a run that changes any of them (the sink refuses
# one that numbers its stream differently; a launcher-led --resume checks all of these before any role starts)
MADE_WITH = ("dataset", "standardize", "equalize", "whiten", "layers", "layer", "optim.name")  # the optimizer: its state
ACTIVATIONS = ("x_pos", "x_neg", "x_neu", "x_all")  # what a layer hands the next layer, and the sink never reads
UPDATE_INPUTS = ("x", "x_pos", "x_neg")  # a train batch's tensors that the update's loss checks for NaN and Inf
FORWARDED = {"train": ("total", "classes", "batch", "shape"),
             "eval": ("split", "round", "batches", "part", "classes", "final", "after", "shape")}



def _normalizable(x: torch.Tensor) -> bool:
    """Every row's sum of squares is finite: no NaN, no Inf, nothing so large that `ff.normalize` overflows."""
    return bool(torch.isfinite(x.pow(2).sum(dim=1)).all())


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _earlier_layer_key(key: str, index: int) -> bool:
    """'layer3.applied' is an earlier layer's key for every index above 3."""
    m = re.match(r"layer(\d+)\.", key)
    return m is not None and int(m.group(1)) < index


def _upstream_scalars(scalars: dict, kind: str, index: int, prefixes: tuple[str, ...]) -> dict:
    """The scalars a layer passes on: the known keys of its kind and what earlier layers added, nothing else."""
    keep = {k: scalars[k] for k in FORWARDED.get(kind, ()) if k in scalars}
    for k, v in scalars.items():
        head, _, tail = k.rpartition(".")
        if any(k.startswith(p) for p in prefixes) and tail.isdigit() and int(tail) < index and head:
            keep[k] = v
    return keep


class Worker:
    def __init__(self, cfg: RunConfig, index: int, topo: Topology, out: Path, device: str = "cpu",
                 peer_timeout_s: float = 120.0, resume: bool = False):
        if not 0 <= index < len(cfg.layers):
            raise ValueError(f"--index {index} is out of range for {len(cfg.layers)} layers")
        self.cfg, self.index, self.topo, self.out, self.device = cfg, index, topo, Path(out), torch.device(device)
        self.timeout_ms = int(peer_timeout_s * 1000)
        self.layer: torch.nn.Module | None = None  # built on the first in-order batch (its width, shape and classes)
        self.opt: torch.optim.Optimizer | None = None
        self.shape: str | None = None  # the dataset's image shape and class count, once the layer is built
        self.classes: int | None = None
        self.epoch = -1
        self.applied = 0
        self.last_batch = 0  # the source numbers train batches 1, 2, ...; the highest this layer has applied
        self.durable = 0  # the highest batch this layer's checkpoint holds
        self.out_of_order = 0  # batches dropped because an earlier one had not arrived (resent later)
        self.gap_notice_at = float("-inf")
        self.rejected = Rejections(f"layer {index}")
        self.busy_s = 0.0  # time spent handling messages (train and eval)
        self.train_busy_s = 0.0  # time spent handling train messages, and the window they span:
        self.train_window: tuple[float, float] | None = None  # (first train message in, last train reply out)
        self.updates = 0  # local updates made by this process; all but the first (which builds the optimizer's
        self.update_s = self.update_cpu_s = 0.0  # state) are timed: wall and this thread's CPU, on a CPU device
        self.memory = PeakMemory()  # from the end of the first train batch (imports, layer and optimizer built)
        self.stopping = False
        self.stopped_alone = False  # left on a SIGTERM of its own, not at the stream's stop: the run is not over
        self.passed_stop: Message | None = None  # the stop this layer forwarded before a restart (in its checkpoint)
        self.state = "waiting"  # what the heartbeat reports: waiting (for input), working, sending (blocked downstream)
        self.replayed = 0
        self.writer = checkpoint.BackgroundWriter()
        if resume and self.path.is_file():
            self.load()

    @property
    def path(self) -> Path:
        return self.out / f"layer{self.index}.pt"

    def load(self) -> None:
        """Continue from this layer's checkpoint: weights, optimizer, and which batches it has applied."""
        payload = checkpoint.load(self.path, map_location=str(self.device))
        if "config" in payload and (changed := self.cfg.changed_from(RunConfig.from_json(payload["config"]), MADE_WITH)):
            raise checkpoint.CheckpointError(
                f"{self.path}: made with other {', '.join(changed)} ({', '.join(f'{k}={v!r}' for k, v in changed.items())}); "
                "resume with the same settings, or start a new run in another --out")
        try:
            # checkpoints written before image layers hold fully connected layers, which need no class count
            self._ensure_layer(int(payload["in_features"]), payload.get("shape"), payload.get("classes") or 2)
            self.classes = payload.get("classes")  # None (not checked) for such a checkpoint
            self.layer.load_state_dict(payload["layer"])
            if not self.layer.resumable:
                raise ValueError(RESUME_OLD_LAYOUT)
            self.opt.load_state_dict(payload["optimizer"])
            self.applied, self.last_batch, self.epoch = payload["applied"], payload["last_batch"], payload["epoch"]
            self.durable = self.last_batch
            if payload.get("stop") and not payload["stop"].get("source.interrupted"):  # the run's final stop
                self.passed_stop = Message("stop", payload["stop_seq"], 0, payload["stop"])
        except (KeyError, TypeError, ValueError, RuntimeError, WireError) as e:
            raise checkpoint.CheckpointError(f"{self.path}: does not match this run ({type(e).__name__}: {e})") from e
        if self.epoch >= 0:
            set_lr(self.opt, self.cfg.optim.lr * ff.lr_factor(self.epoch, self.cfg.epochs, self.cfg.optim.schedule))

    # ---- the FF work, one message at a time

    def _ensure_layer(self, in_features: int, shape, classes) -> torch.nn.Module:
        """Build this layer from the first in-order batch: its width, the source's input shape (which sizes
        image layers) and the class count (which sizes an image layer's label bias)."""
        if self.layer is None:
            cfg = self.cfg
            if not 0 < in_features <= MAX_INPUT_FEATURES:
                raise WireError(f"batch of width {in_features} is not a plausible input")
            shape = parse_shape(shape)
            try:
                if shape is not None:  # the dataset's (C, H, W): the plan sizes every layer from it
                    in_shape = plan(cfg.layers, shape)[self.index][1]
                elif self.index == 0:
                    in_shape = (in_features,)
                else:  # a fully connected net needs no shape (an image net fails here, for want of one)
                    in_shape = (out_widths(cfg.layers, None)[self.index - 1],)
            except ValueError as e:
                raise WireError(str(e)) from None
            if in_features != math.prod(in_shape):
                raise WireError(f"batch of width {in_features}, layer {self.index} takes {math.prod(in_shape)}")
            if not (isinstance(classes, int) and not isinstance(classes, bool) and 1 < classes <= MAX_CLASSES):
                raise WireError(f"a batch must name its number of classes (2..{MAX_CLASSES}), got {classes!r}")
            try:
                layer = build_layer(self.index, cfg.layers[self.index], in_shape, cfg.layer, cfg.seed, classes)
            except ValueError as e:  # e.g. fewer channels than classes for the competitive loss
                raise WireError(str(e)) from None
            self.layer = layer.to(self.device)
            self.opt = make_optimizer(self.layer.parameters(), cfg.optim)
            self.shape, self.classes = (None if shape is None else "x".join(map(str, shape))), classes
        return self.layer

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def _check_rows(self, name: str, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or x.ndim != 2 or x.shape[0] == 0 or (rows is not None and x.shape[0] != rows):
            raise WireError(f"{name} must be a non-empty float32 (B, D) tensor{f' of {rows} rows' if rows else ''}; "
                            f"got {x.dtype} {tuple(x.shape)}")
        return self._to(x)

    def _labels(self, t: dict, name: str, rows: int, classes: int) -> torch.Tensor:
        y = t[name]
        if y.dtype != torch.int64 or y.shape != (rows,) or not bool(((y >= 0) & (y < classes)).all()):
            raise WireError(f"{name} must be int64 ({rows},) in [0, {classes})")
        return self._to(y)

    def _write_labels(self, msg: Message) -> dict:
        """What layer 0 learns from, built from the images as the source sends them, once each ("x"): the positive
        (the true labels written in, `ff.overlay`) and the negative (the wrong labels "neg"), for the readout the
        neutral-label pass, and for an evaluation every candidate label; the in-process trainer builds the very
        same. The source would otherwise send two or three copies of each image, and ten of each evaluated one."""
        cfg, t = self.cfg, dict(msg.tensors)
        x = self._check_rows("x", t.pop("x"))
        c = msg.scalars.get("classes")
        if not (isinstance(c, int) and not isinstance(c, bool) and 1 < c <= MAX_CLASSES):
            raise WireError(f"a batch must name its number of classes (2..{MAX_CLASSES}), got {c!r}")
        if self.classes and c != self.classes:
            raise WireError(f"a batch of {c} classes, layer {self.index} has {self.classes}")
        if self.layer is not None and x.shape[1] != self.layer.in_features:
            raise WireError(f"a batch of width {x.shape[1]}, layer {self.index} takes {self.layer.in_features}")
        if x.shape[1] < c and not cfg.competitive:  # the labels are written into the first c inputs
            raise WireError(f"a batch of width {x.shape[1]} cannot hold {c} labels")
        value = label_value(x, cfg.label_value)
        if msg.kind == "train" and cfg.competitive:  # no labels written in: the layers learn from them
            t["x_pos"] = x
        elif msg.kind == "train":
            t["x_pos"] = ff.overlay(x, self._labels(t, "y", x.shape[0], c), c, value)
            t["x_neg"] = ff.overlay(x, self._labels(t, "neg", x.shape[0], c), c, value)
        elif self.layer is None:  # before the first batch, `classes` is anything the message says: build nothing
            raise WireError(f"an eval batch before layer {self.index} has seen its first train batch")
        else:
            t["x_all"] = x if cfg.competitive else ff.overlay_all_labels(x, c, value)
        if cfg.uses_readout and not cfg.competitive:  # the competitive loss's own pass is the readout's
            t["x_neu"] = ff.overlay(x, None, c, value)
        return t

    def on_train(self, msg: Message) -> Message:
        t = self._write_labels(msg) if self.index == 0 and "x" in msg.tensors else msg.tensors
        x_pos = self._check_rows("x_pos", t["x_pos"])
        b = x_pos.shape[0]
        competitive = self.cfg.competitive  # no negatives: the layer learns from the labels
        x_neg = None if competitive else self._check_rows("x_neg", t["x_neg"], b)
        if (x_neg is not None and x_neg.shape != x_pos.shape) or t["y"].shape != (b,) or t["idx"].shape != (b,):
            raise WireError(f"train batch of {b} rows needs x_neg {tuple(x_pos.shape)}, y and idx of ({b},)")
        batch, total = msg.scalars.get("batch"), msg.scalars.get("total")
        if not (_is_count(batch) and _is_count(total) and batch <= total):
            raise WireError(f"train message needs integers 1 <= batch <= total, got batch {batch!r} and total {total!r}")
        if self.layer is not None and x_pos.shape[1] != self.layer.in_features:
            raise WireError(f"train batch of width {x_pos.shape[1]}, layer {self.index} takes {self.layer.in_features}")
        if batch > self.last_batch + 1:  # an earlier batch was lost on the way: the source resends from there
            self.out_of_order += 1
            now = time.monotonic()
            if now - self.gap_notice_at < GAP_NOTICE_S:
                return None
            self.gap_notice_at = now
            return Message("gap", msg.seq, msg.epoch, {"layer": self.index, "needs": self.last_batch + 1})
        # only a complete, in-order batch may build the layer (its width decides layer 0's input size)
        fresh, epoch = self.layer is None, self.epoch  # as they were, should the update refuse the batch
        layer = self._ensure_layer(x_pos.shape[1], msg.scalars.get("shape"), msg.scalars.get("classes"))
        if x_pos.shape[1] != layer.in_features:
            raise WireError(f"train batch of width {x_pos.shape[1]}, layer {self.index} takes {layer.in_features}")
        if competitive and (t["y"].dtype != torch.int64 or not bool(((t["y"] >= 0) & (t["y"] < self.classes)).all())):
            raise WireError(f"train labels must be int64 in [0, {self.classes})")
        scalars = _upstream_scalars(msg.scalars, "train", self.index, ("loss.", "g_pos.", "g_neg.", "durable."))
        scalars[f"durable.{self.index}"] = self.durable
        if batch <= self.last_batch:  # a batch this layer has learned from already: forward it, never apply it twice
            check_finite({"x_pos": x_pos, **({} if x_neg is None else {"x_neg": x_neg})})  # no update checks them
            self.replayed += 1
            with torch.no_grad():
                h = layer(x_pos if x_neg is None else torch.cat([x_pos, x_neg]))
            out = {k: t[k] for k in ("y", "idx")}
            out.update(x_pos=h[:b], **({} if x_neg is None else {"x_neg": h[b:]}))
            out.update(self._readout(layer, t, h[:b], b))
            return Message("train", msg.seq, msg.epoch, scalars, out)
        if msg.epoch != self.epoch:
            self.epoch = msg.epoch
            set_lr(self.opt, self.cfg.optim.lr * ff.lr_factor(msg.epoch, self.cfg.epochs, self.cfg.optim.schedule))
        out = {"y": t["y"], "idx": t["idx"]}
        if "x_neu" in t:  # neutral pass first, with the weights the in-process trainer would use
            out.update(self._neutral(layer, t, b))
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            r = local_update(layer, self.opt, x_pos, x_neg, self._to(t["y"]) if competitive else None)
        except NonFiniteLoss as e:  # the layer is as it was
            self._forget(fresh, epoch)
            if not all(_normalizable(x) for x in (x_pos, x_neg) if x is not None):  # (this pass only runs here)
                raise WireError(f"train batch refused: {e}") from None  # NaN, Inf, or too large to normalize
            # on inputs it can normalize, a healthy layer's loss is finite: this one has diverged, and every batch
            # would be refused and resent for ever
            raise Diverged(f"layer {self.index} has diverged: its loss on train batch {batch}, whose inputs are finite, is "
                           f"not finite; its last checkpoint is as it was (a lower --lr may help)") from None
        if self.updates and self.device.type == "cpu":  # on a GPU this would time the kernel launches only
            self.update_s += time.perf_counter() - w0
            self.update_cpu_s += time.thread_time() - c0
        self.updates += 1
        self.applied += 1
        self.last_batch = batch
        if batch == total:  # the run's last batch: durable before it goes on
            self.save()
            scalars[f"durable.{self.index}"] = self.durable
        elif batch % self.cfg.checkpoint_every == 0:  # written while the next batches train; durable once on disk
            self.save_in_background()
        out.update(x_pos=r.h_pos, **({} if r.h_neg is None else {"x_neg": r.h_neg}))
        if competitive and "feats" in t:  # outputs before the update, as the in-process trainer's readout reads them
            out["feats"] = self._features(t, r.h_pos, b)
        loss, g_pos, g_neg = torch.stack([r.loss, r.g_pos, r.g_neg]).tolist()  # one read (one sync on a GPU), not three
        scalars.update({f"loss.{self.index}": loss, f"g_pos.{self.index}": g_pos, f"g_neg.{self.index}": g_neg})
        return Message("train", msg.seq, msg.epoch, scalars, out)

    @torch.no_grad()
    def on_eval(self, msg: Message) -> Message:
        t = self._write_labels(msg) if self.index == 0 and "x" in msg.tensors else msg.tensors
        x_all, acc = self._check_rows("x_all", t["x_all"]), t["goodness"]
        competitive = self.cfg.competitive  # one row per image, not one per (image, label)
        if acc.dtype != torch.float32 or acc.ndim != 2 or x_all.shape[0] != acc.shape[0] * (1 if competitive else acc.shape[1]):
            raise WireError(f"eval batch needs goodness (B, C) and x_all ({'B' if competitive else 'B*C'}, D), "
                            f"got {tuple(acc.shape)} and {tuple(x_all.shape)}")
        b, c = acc.shape
        after = msg.scalars.get("after")  # the train batch this evaluation follows
        if _is_count(after) and after > self.last_batch:  # this layer lost batches (a restart): resent first
            self.out_of_order += 1
            return Message("gap", msg.seq, msg.epoch, {"layer": self.index, "needs": self.last_batch + 1})
        if self.layer is None:
            raise WireError(f"an eval batch before layer {self.index} has seen its first train batch")
        layer = self.layer
        if x_all.shape[1] != layer.in_features:
            raise WireError(f"eval batch of width {x_all.shape[1]}, layer {self.index} takes {layer.in_features}")
        h = layer(x_all)
        if self.index >= self.cfg.first_scored:
            if competitive:
                if c != self.classes:
                    raise WireError(f"eval batch of {c} classes, layer {self.index} has {self.classes}")
                acc = acc + layer.class_goodness(h).cpu()
            else:
                acc = acc + layer.goodness(h).view(b, c).cpu()
        out = {"x_all": h, "goodness": acc, "y": t["y"], **self._readout(layer, t, h, b)}
        scalars = _upstream_scalars(msg.scalars, "eval", self.index, ("ahead.",))
        if _is_count(after) and after < self.last_batch:  # a resent round: scored with weights of later batches
            scalars[f"ahead.{self.index}"] = self.last_batch - after
        return Message("eval", msg.seq, msg.epoch, scalars, out)

    def _forget(self, fresh: bool, epoch: int) -> None:
        """Undo what a batch its update refused changed before: the layer it built, or its epoch's learning rate."""
        if fresh:
            self.layer = self.opt = None
        elif epoch != self.epoch:  # -1: none applied yet, the optimizer's first learning rate
            set_lr(self.opt, self.cfg.optim.lr * ff.lr_factor(max(epoch, 0), self.cfg.epochs, self.cfg.optim.schedule))
        self.epoch = epoch

    def _readout(self, layer: torch.nn.Module, t: dict, h: torch.Tensor, rows: int) -> dict:
        """What the readout takes from this layer: the neutral-label pass and its features, or with the competitive
        loss the features of `h`, the outputs this layer computed for the message; nothing without a readout."""
        if "x_neu" in t:
            return self._neutral(layer, t, rows)
        if self.cfg.competitive and "feats" in t:
            return {"feats": self._features(t, h, rows)}
        return {}

    @torch.no_grad()
    def _neutral(self, layer: torch.nn.Module, t: dict, rows: int) -> dict:
        """The neutral-label pass, and this layer's normalized activity appended to the readout's features."""
        x_neu = self._check_rows("x_neu", t["x_neu"], rows)
        if x_neu.shape[1] != layer.in_features:
            raise WireError(f"x_neu of width {x_neu.shape[1]}, layer {self.index} takes {layer.in_features}")
        h_neu = layer(x_neu)
        return {"x_neu": h_neu, "feats": self._features(t, h_neu, rows)}

    def _features(self, t: dict, h: torch.Tensor, rows: int) -> torch.Tensor:
        """The readout's features so far, with this layer's normalized outputs `h` appended if the readout reads it."""
        feats = t["feats"]
        if feats.dtype != torch.float32 or feats.ndim != 2 or feats.shape[0] != rows:
            raise WireError(f"feats must be float32 ({rows}, F); got {feats.dtype} {tuple(feats.shape)}")
        feats = self._to(feats)
        if self.index >= self.cfg.first_readout:
            feats = torch.cat([feats, ff.normalize(h, self.cfg.layer.norm)], dim=1)
        return feats

    def _payload(self, stop: Message | None = None) -> dict:
        return {"stop": stop.scalars if stop is not None else None, "stop_seq": stop.seq if stop is not None else 0,
                "config": self.cfg.to_json(), "index": self.index, "in_features": self.layer.in_features,
                "shape": self.shape, "classes": self.classes,  # what an image layer, or the competitive loss, is built for
                "layer": self.layer.state_dict(), "optimizer": self.opt.state_dict(),
                "applied": self.applied, "last_batch": self.last_batch, "epoch": self.epoch}

    def save(self, stop: Message | None = None) -> None:
        """The layer, its optimizer and what it applied, on disk before this returns; with `stop`, also the stop
        it forwards next (a restart after that forwards it again instead of waiting for batches that never come)."""
        self.writer.wait()
        if self.layer is None:
            return
        checkpoint.save(self.path, self._payload(stop))
        self.durable = self.last_batch

    def save_in_background(self) -> None:
        """The same checkpoint of a copy of the state, written while training goes on (the digest, serialization
        and fsync had taken 30-45 ms of a 784-wide stage's loop every checkpoint_every batches, and longer for wider
        layers); `durable` moves once it is on disk. The copy costs the layer's state once more in memory."""
        batch = self.last_batch

        def durable():
            self.durable = batch

        self.writer.submit(self.path, checkpoint.snapshot(self._payload()), durable)

    def _check_stop(self, msg: Message) -> None:
        """The source's stop names the train batches it sent, every one of which came before it on this link: one
        naming fewer than this layer has applied, or none, is not this run's stop (a forged one, without --keys)."""
        sent = msg.scalars.get("source.sent_train")
        if not (isinstance(sent, int) and not isinstance(sent, bool) and sent >= self.last_batch):
            raise WireError(f"a stop must name the source's train batches sent, at least the {self.last_batch} this "
                            f"layer has applied; got {sent!r}")

    def _for_next(self, reply: Message) -> Message:
        """What goes downstream. The sink reads labels, goodness, readout features and scalars, never the
        activations: the last layer leaves them out (in a 2-layer pipeline, a third of the bytes on the wire)."""
        if self.index < len(self.cfg.layers) - 1:
            return reply
        kept = {k: v for k, v in reply.tensors.items() if k not in ACTIVATIONS}
        return Message(reply.kind, reply.seq, reply.epoch, reply.scalars, kept)

    def stats(self) -> dict:
        i = self.index
        return {f"layer{i}.applied": self.applied,
                f"layer{i}.last_batch": self.last_batch, f"layer{i}.replayed": self.replayed,
                f"layer{i}.out_of_order": self.out_of_order, f"layer{i}.rejected": self.rejected.total(),
                f"layer{i}.rejected_reasons": self.rejected.reasons(),
                **{f"layer{i}.{k}": v for k, v in self.memory.report().items()},
                f"layer{i}.busy_s": round(self.busy_s, 3), f"layer{i}.device": str(self.device),
                f"layer{i}.train_busy": round(self.train_busy_s / (w[1] - w[0]), 3) if (w := self.train_window) and w[1] > w[0] else None,
                f"layer{i}.cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 3),
                f"layer{i}.update_ms": round(self.update_s / timed * 1000, 3) if (timed := self.updates - 1) > 0 and self.update_s else None,
                f"layer{i}.update_cpu_ms": round(self.update_cpu_s / timed * 1000, 3) if timed > 0 and self.update_s else None,
                f"layer{i}.peak_gpu_mb": (round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
                                          if self.device.type == "cuda" else None)}

    # ---- the loop

    def run(self) -> None:
        links = transport.Links(self.topo.keys)
        inbox = links.pull(self.topo.layers[self.index].bind_url(self.topo.bind_host))
        outbox = links.push(self.topo.downstream(self.index).connect_url(), linger_ms=self.timeout_ms)
        beat = transport.Heartbeat(links, self.topo.sink.connect_url(), f"layer {self.index}",
                                   lambda: {"state": self.state, "applied": self.applied})
        handlers = {"train": self.on_train, "eval": self.on_eval, "gap": lambda msg: msg}
        idle = transport.IdleClock(f"layer {self.index}", self.timeout_ms)
        try:
            if self.passed_stop is not None:  # restarted after forwarding the stop: nothing but the stop remains
                print(f"ffpipe layer {self.index}: had passed the stop on; forwarding it again", flush=True)
                transport.send(outbox, self.passed_stop, self.timeout_ms)
                return
            while True:
                if self.stopping:  # SIGTERM to this worker alone: keep what it learned, leave without forwarding
                    self.save()
                    self.stopped_alone = True
                    return
                try:
                    msg = transport.recv(inbox, POLL_MS, check_finite=False)
                    if msg is None:
                        idle.tick(POLL_MS)
                        continue
                    check_finite(msg.tensors, UPDATE_INPUTS if msg.kind == "train" else ())
                    idle.reset()
                    if msg.kind == "stop":
                        self._check_stop(msg)
                        break
                    if msg.kind not in handlers:
                        raise WireError(f"a layer does not take {msg.kind!r} messages")
                    t0 = time.perf_counter()
                    self.state = "working"
                    reply = handlers[msg.kind](msg)
                    t1 = time.perf_counter()
                    self.busy_s += t1 - t0
                    if msg.kind == "train":
                        self.train_busy_s += t1 - t0
                        self.train_window = (self.train_window or (t0, t1))[0], t1
                        self.memory.training_starts()  # after the first batch, which built the layer and optimizer
                    elif msg.kind == "eval":
                        self.memory.training_pauses()
                except (WireError, KeyError) as e:  # a bad message: count it, say so once per reason, keep serving
                    self.rejected.add(f"{type(e).__name__}: {e}"[:160])
                    idle.rejected()
                    continue
                if reply is not None:
                    self.state = "sending"
                    try:
                        transport.send(outbox, self._for_next(reply), self.timeout_ms)
                    except WireError as e:  # over the wire's caps: only a forged message can make one (the launcher
                        self.rejected.add(f"reply to {msg.kind}: {e}"[:160])  # refuses runs whose batches would)
                self.state = "waiting"
            transport.reject_the_rest(inbox, self.rejected, expected=("stop",))  # the source resends an unconfirmed stop
            scalars = {k: v for k, v in msg.scalars.items() if k.startswith("source.") or _earlier_layer_key(k, self.index)}
            stop = Message("stop", msg.seq, msg.epoch, {**scalars, **self.stats()})
            self.save(stop)
            transport.send(outbox, stop, self.timeout_ms)
        finally:
            beat.stop()
            try:
                self.writer.wait()  # a checkpoint half written when the process ends would be left as a temporary file
            except Exception as e:  # noqa: BLE001 - the loop's own error, if any, is the one to report
                print(f"ffpipe layer {self.index}: a background checkpoint failed: {e}", flush=True)
            inbox.close()
            outbox.close()
            links.close()


def run_worker(cfg: RunConfig, index: int, topo: Topology, out: Path, device: str = "cpu", threads: int = 1,
               resume: bool = False, quiet: bool = False) -> bool:
    """Serve until the stream's stop (returns False) or a SIGTERM to this worker alone (True: the run goes on
    without it, so its exit status says so). `quiet`: no closing line."""
    set_compute(threads or 1)
    warm_up_optimizers()
    worker = Worker(cfg, index, topo, out, device, resume=resume)

    def request_stop(signum, frame):  # finish the message in hand, checkpoint, exit
        worker.stopping = True
        transport.exit_soon_if_orphaned()

    # Ctrl-C reaches the whole process group: the launcher turns it into a stop message from the source,
    # which ends each worker in order. SIGTERM sent to this worker alone stops it where it is.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, request_stop)
    worker.run()
    if not quiet or worker.stopped_alone:
        print(f"ffpipe layer {index}: applied {worker.applied} batches, rejected {worker.rejected.total()}, "
              f"busy {worker.busy_s:.1f}s" + (" (stopped by SIGTERM before the run's end)" if worker.stopped_alone else ""), flush=True)
    return worker.stopped_alone
