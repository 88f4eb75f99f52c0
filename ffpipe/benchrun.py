"""One benchmark variant in its own process: `python -m ffpipe.benchrun SPEC.json` writes the record to spec["record"].

Each variant runs in a fresh process (and the pipelined ones start their own), so a process's peak memory is
its own and no variant inherits another's threads, caches or allocator state. `ffpipe bench` starts these.

Throughput: `steps` mini-batches (optimizer steps for bp-gpipe/bp-1f1b); the first `warmup` are not timed.
Each training image counts once (FF's positive and negative pass of an image are one sample).
Memory: each process's peak RSS over its life, its RSS after its first training step (`rss_start_mb`: imports,
model and optimizer state are in by then) and its peak from there on (`train_peak_rss_mb`); the difference is
what steady training adds: activations kept for backward, queued messages, leaks.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from ffpipe import config
from ffpipe.data import Split, batch_indices, hold_out, load
from ffpipe.layer import set_compute
from ffpipe.metrics import PeakMemory

VARIANTS = ("ff-inprocess", "ff-pipeline", "bp-inprocess", "bp-gpipe", "bp-1f1b")


# ---------------------------------------------------------------- measurement helpers


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return round(r.ru_utime + r.ru_stime, 3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and CPU time of a timed region; CPU time / wall time is the process's busy fraction (1 thread)."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def stop(self, samples: int) -> dict:
        wall = time.perf_counter() - self.wall0
        busy = (time.process_time() - self.cpu0) / wall if wall > 0 else None
        return {"timed_samples": samples, "timed_s": round(wall, 4), "samples_per_s": samples / wall if wall > 0 else None,
                "busy": round(busy, 3) if busy is not None else None}


def prepare_split(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images to flat [0, 1] floats on the device, as FF's inputs (before the label overlay)."""
    return split.x.to(device, torch.float32).div_(255).flatten(1), split.y.to(device)


def load_data(spec: dict, device: torch.device):
    data = hold_out(load(spec["dataset"], spec["data_dir"], download=False), 0)
    x, y = prepare_split(data.train, device)
    return data, x, y


def ff_config(spec: dict, **extra) -> config.RunConfig:
    """The hinton recipe with the benchmark's widths, batch size, negatives, seed, device and threads."""
    return config.preset(
        "hinton", dataset=spec["dataset"], data_dir=spec["data_dir"], download=False, layers=tuple(spec["layers"]),
        batch_size=spec["batch_size"], negatives=spec["negatives"], seed=spec["seed"], device=spec["device"],
        threads=spec["threads"], skip_first=len(spec["layers"]) > 1, **extra)


def _time_to(history: list[dict], targets: list[float], clock: str = "wall_s") -> dict:
    out = {}
    for t in targets:
        hit = next((h for h in history if h.get("split", "test") == "test" and h["accuracy"] >= t), None)
        if hit is not None:
            out[str(t)] = hit[clock]
    return out


def timed_steps(spec: dict, step, n: int, gen: torch.Generator, device: torch.device, ready=None) -> dict:
    """A single-process variant's throughput run: `spec["steps"]` calls of step(batch indices) over shuffled
    epochs of n images; the first `spec["warmup"]` untimed. Memory is counted from after the first step.
    `ready()`, if given, is called between the warm-up and the timed steps (copies run at once wait there)."""

    def batches():
        while True:
            yield from batch_indices(n, spec["batch_size"], gen)

    it, memory = batches(), PeakMemory()
    for _ in range(spec["warmup"]):
        step(next(it))
        memory.training_starts()
    sync(device)
    if ready is not None:
        ready()
    clock, samples = Clock(), 0
    for _ in range(spec["steps"] - spec["warmup"]):
        idx = next(it)
        step(idx)
        samples += len(idx)
    sync(device)
    timing = clock.stop(samples)
    proc = {**memory.report(), "busy": timing["busy"]}
    if device.type == "cuda":
        proc["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return {**timing, "processes": {"main": proc}}


# ---------------------------------------------------------------- variants


def ff_inprocess(spec: dict, out: Path, ready=None) -> dict:
    from ffpipe import inprocess
    from ffpipe.data import load as load_dataset
    from ffpipe.layer import make_optimizer

    set_compute(spec["threads"])
    if spec["to_accuracy"]:
        cfg = ff_config(spec, epochs=spec["max_epochs"], eval_every=1, out=str(out))
        summary = inprocess.train(cfg, load_dataset(cfg.dataset, cfg.data_dir, download=False), show_progress=False)
        return {"history": summary["history"], "time_to_accuracy_s": _time_to(summary["history"], spec["to_accuracy"]),
                "processes": {"main": PeakMemory().report()}}
    cfg = ff_config(spec, out=str(out))
    data = load_dataset(cfg.dataset, cfg.data_dir, download=False)
    net = inprocess.build(cfg, data)
    opts = [make_optimizer(layer.parameters(), cfg.optim) for layer in net.layers]
    ro_opt = make_optimizer(net.readout.parameters(), cfg.readout_optim)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)

    layer_s = [0.0] * len(net.layers)

    def step(idx):
        inprocess.train_step(net, opts, ro_opt, data.train.x[idx], data.train.y[idx], gen, layer_s=layer_s)

    def timing_starts():  # between the warm-up and the timed steps: each layer's update time counts from here
        layer_s[:] = [0.0] * len(layer_s)
        if ready is not None:
            ready()

    record = timed_steps(spec, step, len(data.train), gen, device, timing_starts)
    inprocess.check_skipped(opts, ro_opt)  # a run that diverged (off the CPU, counted on the device) is no figure
    if device.type == "cpu":  # each layer's local update per batch, as ff-pipeline's layers report theirs
        timed = spec["steps"] - spec["warmup"]
        record["processes"]["main"]["update_ms"] = [round(s / timed * 1000, 3) for s in layer_s]
    return record


CEILING_WAIT_S = 600  # how long a copy waits for the others to finish their warm-up


def _ceiling_copy(spec: dict, out: str, barrier) -> None:
    from ffpipe.launcher import die_with_launcher

    die_with_launcher("FFPIPE_CEILING_PID")  # a ceiling run killed outright takes its copies with it
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = ff_inprocess(spec, out, ready=lambda: barrier.wait(CEILING_WAIT_S))
    (out / "record.json").write_text(json.dumps(record))


def ceiling(spec: dict, out: Path) -> dict:
    """`copies` ff-inprocess runs in as many processes at once, their timed steps started together: what this
    machine gives that many busy processes that share nothing but the hardware, each against one alone. A
    pipeline with as many busy processes shares the same cores, caches and memory bandwidth (and adds the wire),
    so ffpipe bench reports its efficiency against this ceiling too."""
    import multiprocessing as mp
    import multiprocessing.connection

    ctx = mp.get_context("spawn")  # fresh interpreters: no copy inherits this one's threads or allocator
    copies = spec["copies"]
    os.environ["FFPIPE_CEILING_PID"] = str(os.getpid())
    barrier = ctx.Barrier(copies)
    procs = [ctx.Process(target=_ceiling_copy, args=(spec, str(out / f"copy{i}"), barrier), daemon=True)
             for i in range(copies)]
    for p in procs:
        p.start()
    pending = {p.sentinel: p for p in procs}
    while pending:  # a copy that fails breaks the barrier, so the others stop waiting for it
        for sentinel in mp.connection.wait(list(pending)):
            proc = pending.pop(sentinel)
            proc.join()  # the sentinel can fire before the exit status is in: without this, exitcode may be None
            if proc.exitcode != 0:
                barrier.abort()
    failed = [f"copy {i} exit code {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"ceiling run failed: {', '.join(failed)}")
    records = [json.loads((out / f"copy{i}" / "record.json").read_text()) for i in range(copies)]
    return {"copies": copies, "samples_per_s_each": [r["samples_per_s"] for r in records],
            "samples_per_s": sum(r["samples_per_s"] for r in records),
            "processes": {f"copy{i}": r["processes"]["main"] for i, r in enumerate(records)}}


def ff_pipeline(spec: dict, out: Path) -> dict:
    """The real service (launcher, source, one worker process per layer, sink), on `steps` batches."""
    from ffpipe.launcher import launch

    os.environ["FFPIPE_HWM"] = str(spec["hwm"])  # inherited by every role the launcher starts
    data = hold_out(load(spec["dataset"], spec["data_dir"], download=False), 0)
    if spec["to_accuracy"]:
        cfg = ff_config(spec, epochs=spec["max_epochs"], eval_every=1, out=str(out / "run"))
    else:
        n = len(data.train)
        images = spec["steps"] * spec["batch_size"]
        epochs = max(1, math.ceil(images / n))
        cfg = ff_config(spec, epochs=epochs, eval_every=0, train_size=min(images, n), out=str(out / "run"))
    data = hold_out(data, 0, cfg.train_size)
    summary = launch(cfg, data, devices=spec["devices"], threads=spec["threads"], show_progress=False, pin=spec.get("pin", False))
    train_s = summary["train_s"] or float("nan")
    procs = {}
    for role, peak in summary["peak_rss_mb"].items():
        procs[role] = {"peak_rss_mb": peak}
        if role.startswith("layer"):
            procs[role].update(busy=summary["train_busy"].get(role), rss_start_mb=summary["rss_start_mb"].get(role),
                               update_ms=summary["update_ms"].get(role), update_cpu_ms=summary["update_cpu_ms"].get(role),
                               train_peak_rss_mb=summary["train_peak_rss_mb"].get(role),
                               peak_gpu_mb=summary.get("peak_gpu_mb", {}).get(role))
    record = {"processes": procs, "accounting_complete": summary["accounting"]["complete"],
              "devices": summary.get("devices"), "test_accuracy": summary["test_accuracy"]}
    if spec["to_accuracy"]:
        record.update(history=summary["history"], time_to_accuracy_s=_time_to(summary["history"], spec["to_accuracy"]))
    else:
        batches = summary["accounting"]["received_train"]
        record.update(samples_per_s=summary["steady_samples_per_s"], train_batches=batches,
                      warmup_batches=max(1, int(batches * 0.1)) + 1, timed_s=round(train_s, 4))
    return record


def bp_inprocess(spec: dict, out: Path) -> dict:
    from ffpipe import backprop
    from ffpipe.layer import make_optimizer

    set_compute(spec["threads"])
    device = torch.device(spec["device"])
    data, x_all, y_all = load_data(spec, device)
    model = backprop.mlp(x_all.shape[1], spec["layers"], data.num_classes, spec["seed"]).to(device)
    opt = make_optimizer(model.parameters(), backprop.OPTIM)
    gen = torch.Generator().manual_seed(spec["seed"])

    def step(idx):
        idx = idx.to(device)
        loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if spec["to_accuracy"]:
        xt, yt = prepare_split(data.test, device)
        t0, history = time.perf_counter(), []
        for epoch in range(spec["max_epochs"]):
            for idx in batch_indices(len(y_all), spec["batch_size"], gen):
                step(idx)
            history.append({"epoch": epoch + 1, "accuracy": backprop.accuracy(model, xt, yt), "wall_s": round(time.perf_counter() - t0, 2)})
            reached = _time_to(history, spec["to_accuracy"])
            if len(reached) == len(spec["to_accuracy"]):
                break
        return {"history": history, "time_to_accuracy_s": _time_to(history, spec["to_accuracy"]),
                "processes": {"main": PeakMemory().report()}}

    return timed_steps(spec, step, len(y_all), gen, device)


def bp_pipelined(spec: dict, out: Path) -> dict:
    from ffpipe import backprop

    result = backprop.run_pipelined(spec, out)
    ranks = result["ranks"]
    keys = ("peak_rss_mb", "rss_start_mb", "train_peak_rss_mb", "busy", "peak_gpu_mb")
    procs = {f"stage{r['rank']}": {k: r[k] for k in keys if k in r} for r in ranks}
    lead = ranks[0]
    record = {"processes": procs, "microbatches": spec["microbatches"], "step_images": spec["microbatches"] * spec["batch_size"]}
    if spec["to_accuracy"]:
        record.update(history=lead["history"], time_to_accuracy_s=lead["time_to_accuracy_s"])
    else:
        record.update({k: lead[k] for k in ("timed_samples", "timed_s", "samples_per_s")})
    return record


def wire_cost(spec: dict, out: Path) -> dict:
    """What the wire adds to one pipeline stage, against that stage's compute, in one process and thread:
    encode + send + receive + decode of a train message (positives and negatives of one batch at the layer's
    width) over a loopback ZeroMQ PUSH/PULL link, received and checked as a layer worker does (the update's
    inputs are checked for NaN by its loss, in `local_update`), against `local_update` of a width x width layer on it."""
    import zmq

    from ffpipe import transport
    from ffpipe.layer import local_update, make_layer, make_optimizer
    from ffpipe.wire import Message, check_finite
    from ffpipe.worker import UPDATE_INPUTS

    set_compute(spec["threads"])
    width, bs, reps = spec["layers"][-1], spec["batch_size"], min(spec["steps"], 200)
    cfg = ff_config(spec)
    layer = make_layer(1, width, width, cfg.layer, cfg.seed)
    opt = make_optimizer(layer.parameters(), cfg.optim)
    gen = torch.Generator().manual_seed(0)
    x_pos, x_neg = torch.rand(bs, width, generator=gen), torch.rand(bs, width, generator=gen)
    msg = Message("train", 1, 0, {"total": reps, "classes": 10, "batch": 1},
                  {"x_pos": x_pos, "x_neg": x_neg, "y": torch.zeros(bs, dtype=torch.int64), "idx": torch.arange(bs)})
    ctx = zmq.Context()
    inbox = transport.pull(ctx, "tcp://127.0.0.1:*")
    outbox = transport.push(ctx, inbox.getsockopt(zmq.LAST_ENDPOINT).decode(), linger_ms=0)
    try:
        def wire_once():
            transport.send(outbox, msg, 10_000)
            got = transport.recv(inbox, 10_000, check_finite=False)
            assert got is not None and got.tensors["x_pos"].shape == (bs, width)
            check_finite(got.tensors, UPDATE_INPUTS)

        def compute_once():
            local_update(layer, opt, x_pos, x_neg)

        result = {}
        for name, fn in (("wire", wire_once), ("compute", compute_once)):
            for _ in range(max(1, reps // 10)):
                fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            result[f"{name}_ms"] = round((time.perf_counter() - t0) / reps * 1000, 4)
    finally:
        inbox.close()
        outbox.close()
        ctx.term()
    result["message_mb"] = round(2 * bs * width * 4 / 2**20, 2)
    result["wire_fraction"] = round(result["wire_ms"] / result["compute_ms"], 4)
    return result


RUNNERS = {"ff-inprocess": ff_inprocess, "ff-pipeline": ff_pipeline, "bp-inprocess": bp_inprocess,
           "bp-gpipe": bp_pipelined, "bp-1f1b": bp_pipelined}


def main(argv: list[str]) -> int:
    from ffpipe.launcher import die_with_launcher

    die_with_launcher("FFPIPE_BENCH_PID")  # a bench killed outright takes its running variant with it
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["work"])
    out.mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "wire":
        record = wire_cost(spec, out)
    elif spec["kind"] == "ceiling":
        record = ceiling(spec, out)
    else:
        record = RUNNERS[spec["variant"]](spec, out)
    Path(spec["record"]).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
