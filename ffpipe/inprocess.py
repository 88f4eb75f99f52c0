"""The in-process trainer: every FF layer in one loop, one process. Also the reference the pipeline must match.

Per mini-batch ("joint" schedule, Hinton's): overlay the true label (positives) and a wrong one (negatives),
then each layer in turn makes one local update and hands its detached outputs to the next. With hard
negatives, a neutral-label pass first gives the readout's belief, which trains the readout and picks the
wrong labels. The "greedy" schedule (the popular example's) trains layer 0 for all epochs, then layer 1, ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import torch

from ffpipe import checkpoint, ff
from ffpipe.config import RunConfig
from ffpipe.data import Data, augment, batch_indices, input_stats
from ffpipe.layer import RESUME_OLD_LAYOUT, NonFiniteLoss, local_update, make_optimizer, set_compute, set_lr, skipped_steps
from ffpipe.metrics import TARGETS, MetricsWriter, write_json
from ffpipe.model import FFNet, evaluate, fit_whitening, readout_step
from ffpipe.progress import RunProgress

CHECKPOINT_S = 30.0  # an in-process run saves at least this often (and after every evaluation and at the end)


@contextlib.contextmanager
def ctrl_c_between_batches():
    """Ctrl-C as a flag that the batch loop reads: it yields `check`, which raises KeyboardInterrupt once Ctrl-C came.
    Python's own KeyboardInterrupt is raised wherever the main thread happens to be, and when that is a finalizer
    (a tensor's __del__, a weakref callback) Python prints it and drops it: training went on for epochs after
    Ctrl-C. A second Ctrl-C interrupts at once. Outside the main thread no handler can be set: `check` is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    came = []

    def handler(signum, frame):
        if came:
            raise KeyboardInterrupt
        came.append(signum)

    def check():
        if came:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)


def set_threads(threads: int) -> int:
    n = threads or os.cpu_count() or 1
    set_compute(n)
    return n


def build(cfg: RunConfig, data: Data, fit: bool = True, log=None) -> FFNet:
    """The net, its input statistics set from the training data; with --whiten and `fit`, its ZCA whitening fitted
    (a resumed run reads it from its checkpoint instead). `log`: where to say how long the fit took."""
    torch.manual_seed(cfg.seed)
    net = FFNet(data.shape, data.num_classes, cfg)
    mean, std = input_stats(data, cfg.standardize, cfg.equalize)
    net.input_mean.copy_(mean)
    net.input_std.copy_(std)
    if cfg.whiten and fit:
        t0 = time.perf_counter()
        center, matrix = fit_whitening(data.train.x, mean, std, cfg.standardize, cfg.equalize, cfg.whiten)
        net.whiten_center.copy_(center)
        net.whiten_matrix.copy_(matrix)
        if log is not None:
            log(f"ffpipe: ZCA whitening fitted on {len(data.train):,} training images ({center.numel():,} inputs, eps "
                f"{cfg.whiten:g}) in {time.perf_counter() - t0:.1f}s")
    return net.to(cfg.device)


def train_step(net: FFNet, opts, ro_opt, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, only_layer: int | None = None,
               layer_s: list[float] | None = None):
    """One mini-batch. Returns the per-layer StepResults that ran (one layer when `only_layer` is set).
    With `layer_s` (one float per layer), each layer's local update adds its wall time there (ffpipe bench)."""
    cfg, c = net.cfg, net.num_classes
    x = net.inputs(images)  # (B, D)
    y = labels.to(x.device)
    value = net.label_value(x)
    logits = None
    if cfg.uses_readout and only_layer is None and not cfg.competitive:
        with torch.no_grad():
            acts = net.activities(ff.overlay(x, None, c, value))
        logits = readout_step(net.readout, ro_opt, net.readout_features(acts), y, read_after=False)
    if cfg.negatives == "hard" and logits is not None:
        logits = logits.cpu()  # (a host sync, as every hard-negative draw is)
        if not torch.isfinite(logits).all():  # off the CPU the readout's step on them was skipped: stop here
            check_skipped(opts, ro_opt)
        neg = ff.hard_wrong_labels(logits, labels, gen)
    else:
        neg = ff.random_wrong_labels(labels, c, gen)
    if cfg.competitive:  # no overlay, no negatives (drawn all the same, so the pipeline's generator stays in step)
        x_pos, x_neg = x, None
    else:
        x_pos, x_neg = ff.overlay(x, y, c, value), ff.overlay(x, neg.to(x.device), c, value)
    results = []
    for i, (layer, opt) in enumerate(zip(net.layers, opts, strict=True)):
        if only_layer is not None and i < only_layer:  # greedy: earlier layers are frozen
            with torch.no_grad():
                x_pos, x_neg = layer(x_pos), (None if x_neg is None else layer(x_neg))
            continue
        t0 = time.perf_counter()
        try:
            r = local_update(layer, opt, x_pos, x_neg, y, read_after=False)
        except NonFiniteLoss as e:  # diverged (or NaN in the data): stop with the last checkpoint as it was
            raise NonFiniteLoss(f"layer {i}: {e} (a lower --lr may help)") from None
        if layer_s is not None:
            layer_s[i] += time.perf_counter() - t0
        results.append(r)
        if only_layer is not None:
            break
        x_pos, x_neg = r.h_pos, r.h_neg
    if cfg.competitive and cfg.uses_readout and only_layer is None:
        # the competitive loss's pass is the readout's: each layer's outputs before its update, as a pipeline
        # stage appends them (no second pass); the readout trains on them after the layers, which changes nothing
        readout_step(net.readout, ro_opt, net.readout_features([r.h_pos for r in results]), y, read_after=False)
    return results


def check_skipped(opts, ro_opt) -> None:
    """Off the CPU a step whose loss is not finite is skipped on the device and only counted there (no host sync per
    step, see `layer.step_if_finite`): read the counts, and stop the run if any step was skipped. Before anything is
    logged, evaluated or saved; a skipped batch is never passed over in silence."""
    counts = [(f"layer {i}", skipped_steps(o)) for i, o in enumerate(opts)] + [("the readout", skipped_steps(ro_opt))]
    if bad := [f"{who} ({n} step{'s' * (n > 1)})" for who, n in counts if n]:
        raise NonFiniteLoss(f"{', '.join(bad)}: the loss was not finite, and the device skipped those steps: the batches hold "
                            "NaN or Inf, or the net has diverged; the last checkpoint is as it was (a lower --lr may help)")


def checkpoint_payload(net: FFNet, opts, ro_opt, data: Data, epoch: int, batches: int, phase: int = 0,
                       gen: torch.Generator | None = None, progress: dict | None = None) -> dict:
    return {
        "config": net.cfg.to_json(),
        "model": net.state_dict(),
        "optimizers": [o.state_dict() for o in opts],
        "readout_optimizer": ro_opt.state_dict(),
        "epoch": epoch,  # epochs completed in `phase`
        "phase": phase,  # greedy schedule: the layer being trained; joint: 0
        "batches": batches,
        "rng": gen.get_state() if gen is not None else None,
        "progress": progress or {},
        "data": {"name": data.name, "shape": list(data.shape), "classes": data.classes},
    }


def restore(payload: dict, net: FFNet, opts, ro_opt, gen: torch.Generator) -> None:
    """Load a checkpoint's weights, optimizer states and generator state into a freshly built run."""
    try:
        net.load_state_dict(payload["model"])
        if not all(layer.resumable for layer in net.layers):
            raise ValueError(RESUME_OLD_LAYOUT)
        for opt, state in zip(opts, payload["optimizers"], strict=True):
            opt.load_state_dict(state)
        ro_opt.load_state_dict(payload["readout_optimizer"])
        gen.set_state(payload["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint does not match this run's config ({type(e).__name__}: {e})") from e


def train(cfg: RunConfig, data: Data, *, show_progress: bool = True, resume: dict | None = None) -> dict:
    """Train and evaluate in one process; write metrics.jsonl, checkpoint.pt and summary.json under cfg.out.

    `resume`: a checkpoint payload of this run; training continues after its last completed epoch."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = set_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = build(cfg, data, fit=resume is None, log=(lambda line: print(line, flush=True)) if show_progress else None)
    opts = [make_optimizer(layer.parameters(), cfg.optim) for layer in net.layers]
    ro_opt = make_optimizer(net.readout.parameters(), cfg.readout_optim)
    eval_split, eval_name = (data.val, "val") if data.val is not None else (data.test, "test")
    n_train, bs = len(data.train), cfg.batch_size
    batches_per_epoch = (n_train + bs - 1) // bs
    phases = list(range(len(net.layers))) if cfg.schedule == "greedy" else [None]
    total_batches = batches_per_epoch * cfg.epochs * len(phases)

    history, time_to = [], {}
    train_s, batches_done, samples_done = 0.0, 0, 0
    start_phase, start_epoch = 0, 0
    if resume is not None:
        restore(resume, net, opts, ro_opt, gen)
        start_phase, start_epoch, batches_done = resume["phase"], resume["epoch"], resume["batches"]
        p = resume["progress"]
        history, time_to, train_s, samples_done = list(p["history"]), dict(p["time_to"]), p["train_s"], p["samples"]
        check_resumable(cfg, resume)
    wall0 = saved_at = time.perf_counter()
    progress = RunProgress(total_batches, enabled=show_progress)
    progress.advance(batches_done)
    progress.log(
        f"ffpipe: in-process {cfg.preset} run on {data.name} ({n_train:,} train, {len(eval_split):,} {eval_name}) "
        f"from {data.source}; layers {list(cfg.layers)}, batch {bs}, {cfg.epochs} epochs, {cfg.device}, {threads} threads"
        + (f"; resuming after epoch {start_epoch}" if resume is not None else "")
    )
    with MetricsWriter(out / "metrics.jsonl", append=resume is not None) as metrics, progress, ctrl_c_between_batches() as interrupted:
        for k, phase in enumerate(phases):
            if k < start_phase:
                continue
            for epoch in range(start_epoch if k == start_phase else 0, cfg.epochs):
                set_lr_all(opts, ro_opt, cfg, epoch)
                t0 = time.perf_counter()
                for b, idx in enumerate(batch_indices(n_train, bs, gen)):
                    interrupted()
                    images = augment(data.train.x[idx], cfg.shift, cfg.flip, gen)
                    results = train_step(net, opts, ro_opt, images, data.train.y[idx], gen, only_layer=phase)
                    batches_done += 1
                    samples_done += len(idx)
                    if batches_done % cfg.log_every == 0 or b == batches_per_epoch - 1:  # (every epoch's end)
                        check_skipped(opts, ro_opt)
                        elapsed = train_s + time.perf_counter() - t0
                        first = 0 if phase is None else phase
                        for j, r in enumerate(results):
                            metrics.write({"kind": "train", "epoch": epoch, "batch": batches_done, "layer": first + j,
                                           "loss": r.loss.item(), "g_pos": r.g_pos.item(), "g_neg": r.g_neg.item()})
                        progress.status([r.loss.item() for r in results], samples_done / max(elapsed, 1e-9), epoch + 1)
                    progress.advance()
                train_s += time.perf_counter() - t0
                last = epoch == cfg.epochs - 1 and phase in (None, phases[-1])
                evaluated = last or bool(cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and phase in (None, phases[-1]))
                if evaluated:
                    record = _evaluate(net, eval_split, epoch + 1, train_s, wall0)
                    record["split"] = eval_name
                    history.append(record)
                    metrics.write({"kind": "eval", **record})
                    for target in TARGETS:
                        if eval_name == "test" and record["accuracy"] >= target and str(target) not in time_to:
                            time_to[str(target)] = round(train_s, 2)
                    progress.log(
                        f"epoch {epoch + 1:>4}/{cfg.epochs}  {eval_name} accuracy {record['accuracy']:.4f}"
                        + (f" (readout {record['readout_accuracy']:.4f})" if "readout_accuracy" in record else "")
                        + (f" (goodness {record['goodness_accuracy']:.4f})" if "goodness_accuracy" in record else "")
                        + f"  train {train_s:,.0f}s  {samples_done / max(train_s, 1e-9):,.0f} samples/s"
                    )
                # after an evaluation, at the end and at least every CHECKPOINT_S: the seed recipe's epochs are one
                # full batch each, and saving after every one of them cost more than the epoch itself on a GPU
                if evaluated or epoch == cfg.epochs - 1 or time.perf_counter() - saved_at >= CHECKPOINT_S:
                    done = {"history": history, "time_to": time_to, "train_s": train_s, "samples": samples_done}
                    checkpoint.save(out / checkpoint.FILENAME, checkpoint_payload(net, opts, ro_opt, data, epoch + 1, batches_done, k, gen, done))
                    saved_at = time.perf_counter()

    final = history[-1]
    test = final if eval_name == "test" else _evaluate(net, data.test, cfg.epochs, train_s, wall0)
    summary = {
        "dataset": data.name,
        "data_source": data.source,
        "mode": "inprocess",
        "preset": cfg.preset,
        "layers": list(cfg.layers),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "test_accuracy": test["accuracy"],
        "val_accuracy": final["accuracy"] if eval_name == "val" else None,
        "predict": cfg.predict,
        "train_samples_per_s": samples_done / train_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - wall0,
        "time_to_accuracy_s": time_to,
        "threads": threads,
        "device": cfg.device,
        "history": history,
        "config": cfg.to_dict(),
    }
    write_json(out / "summary.json", summary)
    progress.log(f"ffpipe: test accuracy {test['accuracy']:.4f}; wrote {out}/summary.json, metrics.jsonl, {checkpoint.FILENAME}")
    return summary


def check_resumable(cfg: RunConfig, resume: dict) -> None:
    """Refuse to resume a run that has trained every epoch `cfg` asks for (in its last phase, for the greedy
    schedule): before anything in its folder is written."""
    phases = len(cfg.layers) if cfg.schedule == "greedy" else 1
    if resume["epoch"] >= cfg.epochs and resume["phase"] == phases - 1:
        raise ValueError(f"{cfg.out} has trained {resume['epoch']} epochs" + (" in its last phase" if phases > 1 else "")
                         + f", and --epochs {cfg.epochs} asks for no more; nothing to resume (give more --epochs)")


def set_lr_all(opts, ro_opt, cfg: RunConfig, epoch: int) -> None:
    for opt in opts:
        set_lr(opt, cfg.optim.lr * ff.lr_factor(epoch, cfg.epochs, cfg.optim.schedule))
    set_lr(ro_opt, cfg.readout_optim.lr * ff.lr_factor(epoch, cfg.epochs, cfg.readout_optim.schedule))


def _evaluate(net: FFNet, split, epoch: int, train_s: float, wall0: float) -> dict:
    t0 = time.perf_counter()
    record = {"epoch": epoch, "accuracy": evaluate(net, split.x, split.y)["accuracy"]}
    if net.cfg.uses_readout and net.cfg.predict != "readout":
        record["readout_accuracy"] = evaluate(net, split.x, split.y, mode="readout")["accuracy"]
    elif net.cfg.competitive and net.cfg.predict == "readout":  # one pass: its class goodness, beside the readout
        record["goodness_accuracy"] = evaluate(net, split.x, split.y, mode="goodness")["accuracy"]
    record.update(train_s=round(train_s, 2), eval_s=round(time.perf_counter() - t0, 2), wall_s=round(time.perf_counter() - wall0, 2))
    return record
