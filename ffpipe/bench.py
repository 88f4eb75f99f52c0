"""`ffpipe bench`: FF in-process, the FF pipeline and three backprop baselines, side by side, in one invocation.

Every variant runs in its own process group (`python -m ffpipe.benchrun`), one after another so they never
share the cores, on the same data, widths, batch size and threads per process. A variant that fails or runs
past its timeout is killed with everything it started and reported with its error, never dropped.

Writes OUT/bench.json (one record per run, with its exact configuration), OUT/bench.md (the tables) and PNG plots.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ffpipe.benchrun import VARIANTS
from ffpipe.config import MAX_BATCH, MAX_EPOCHS

BENCH_DATASETS = ("mnist", "fashion-mnist", "cifar10", "fer2013", "digits", "synthetic")  # not "auto": a benchmark names its data


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    dataset: str = "synthetic"
    data_dir: str = "data"
    layers: tuple[int, ...] = (1000, 1000)
    batch_size: int = 256
    variants: tuple[str, ...] = VARIANTS
    devices: str = "cpu"
    threads: int = 1  # torch threads in every process
    steps: int = 200  # mini-batches (optimizer steps for bp-gpipe/bp-1f1b) per throughput run; first 10% untimed
    microbatches: int = 4  # m for bp-gpipe / bp-1f1b
    stages: tuple[int, ...] = ()  # also run every variant at these depths (widths: the first of `layers`)
    in_flight: tuple[int, ...] = ()  # memory sweep: ff-pipeline queue depth and bp-gpipe micro-batches
    to_accuracy: tuple[float, ...] = ()  # targets; runs each variant on the real data until reached
    max_epochs: int = 30
    negatives: str = "random"  # FF negatives in throughput runs; --to-accuracy uses the hinton recipe's hard ones
    seed: int = 0
    timeout_s: float = 900.0  # per throughput, memory or wire run
    accuracy_timeout_s: float = 6 * 3600.0  # per --to-accuracy run (FF trains all of --max-epochs)
    pin: bool = False  # ff-pipeline: pin layer i to core i mod n (ffpipe run --pin)
    repeats: int = 1  # rounds of the throughput and ceiling runs, interleaved (a machine's speed drifts)
    keep_checkpoints: bool = False  # keep each run's trained weights (*.pt) in runs/ (they are deleted once its record is read)
    out: str = "bench"

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"--variants must be a comma-separated subset of {', '.join(VARIANTS)}; got {', '.join(bad) or 'none'}")
        for name in ("batch_size", "threads", "microbatches", "max_epochs", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.dataset not in BENCH_DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(BENCH_DATASETS)} (a benchmark names its data); got {self.dataset!r}")
        if self.steps < 3:
            raise ValueError("--steps must be >= 3 (the first 10%, at least one, is warm-up; the clock starts at the next)")
        for flag, value, most in (("--batch-size", self.batch_size, MAX_BATCH), ("--max-epochs", self.max_epochs, MAX_EPOCHS)):
            if value > most:
                raise ValueError(f"{flag} must be at most {most:,}; got {value:,}")
        if not self.layers or any(w < 1 for w in self.layers):
            raise ValueError("--layers must list positive widths, e.g. 1000,1000")
        if any(s < 1 for s in self.stages) or any(k < 1 for k in self.in_flight):
            raise ValueError("--stages and --in-flight take positive integers")
        if any(not 0 < t <= 1 for t in self.to_accuracy):
            raise ValueError("--to-accuracy takes accuracies in (0, 1], e.g. 0.93,0.98")
        if self.negatives not in ("random", "hard"):
            raise ValueError("--negatives must be random or hard")
        if not (self.timeout_s > 0 and self.accuracy_timeout_s > 0) or math.inf in (self.timeout_s, self.accuracy_timeout_s):
            raise ValueError("--timeout and --accuracy-timeout must be finite and > 0")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63); got {self.seed}")
        if self.devices not in ("cpu", "cuda"):  # one device kind for every variant, or the ratios compare other cards
            raise ValueError(f"--devices must be cpu or cuda; got {self.devices!r}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a file; the bench writes a folder")


def check_data(o: BenchOptions, train_images: int) -> None:
    """Refuse a backprop pipeline step of more images than the training set holds: it would never draw a batch."""
    for variant in ("bp-gpipe", "bp-1f1b"):
        if variant not in o.variants:
            continue
        for m, flag in [(o.microbatches, "-m")] + [(k, "--in-flight") for k in o.in_flight if variant == "bp-gpipe"]:
            if m * o.batch_size > train_images:
                raise ValueError(f"{variant}: a step of {flag} {m} x --batch-size {o.batch_size} = {m * o.batch_size:,} images "
                                 f"exceeds the {train_images:,} training images of {o.dataset}; use a smaller {flag} or --batch-size")


PLOTS = ("throughput.png", "memory.png", "accuracy.png")


def usable_cores() -> int:
    """The cores this process may run on (a container's cpuset), not the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _spec(o: BenchOptions, variant: str, kind: str, layers: tuple[int, ...], work: Path, **over) -> dict:
    spec = {
        "variant": variant, "kind": kind, "dataset": o.dataset, "data_dir": o.data_dir, "layers": list(layers),
        "batch_size": o.batch_size, "threads": o.threads, "device": "cuda" if o.devices.startswith("cuda") else "cpu",
        "devices": o.devices, "steps": o.steps, "microbatches": o.microbatches,
        "hwm": 2, "pin": o.pin, "negatives": o.negatives, "seed": o.seed, "to_accuracy": [], "max_epochs": o.max_epochs,
    }
    spec.update(over)
    spec["warmup"] = max(1, spec["steps"] // 10)  # of this run's steps (a sweep may change them)
    spec.setdefault("round", 1)
    spec["rounds"] = o.repeats
    tag = "-".join(str(x) for x in (kind, variant, f"L{len(layers)}", f"m{spec['microbatches']}", f"q{spec['hwm']}", f"s{spec['steps']}"))
    if o.repeats > 1:
        tag += f"-r{spec['round']}"
    spec["work"] = str(work / tag)
    spec["record"] = str(work / tag / "record.json")
    return spec


def plan(o: BenchOptions, cores: int | None = None) -> list[dict]:
    """Every run of the benchmark, in the order they execute. With `repeats` > 1 the throughput and ceiling
    runs come in rounds, every other round in reverse order, so a drift in the machine's speed over the
    benchmark weighs on every variant alike instead of on whichever ran last."""
    work = Path(o.out) / "runs"
    cores = cores or usable_cores()
    specs = []
    depths = sorted({len(o.layers), *o.stages})
    for rnd in range(1, o.repeats + 1):
        block = []
        for depth in depths:
            layers = o.layers if depth == len(o.layers) else (o.layers[0],) * depth
            block += [_spec(o, v, "throughput", layers, work, round=rnd) for v in o.variants]
            busy = min(depth, cores)  # the busy processes a CPU pipeline of this depth gets
            if {"ff-inprocess", "ff-pipeline"} <= set(o.variants) and not o.devices.startswith("cuda") and busy > 1:
                block.append(_spec(o, "ff-inprocess", "ceiling", layers, work, copies=busy, round=rnd))
        specs += block if rnd % 2 else block[::-1]
    if "ff-pipeline" in o.variants:  # what the wire costs a stage, against its compute
        specs.append(_spec(o, "ff-pipeline", "wire", o.layers, work))
    for k in o.in_flight:
        if "ff-pipeline" in o.variants:
            specs.append(_spec(o, "ff-pipeline", "memory", o.layers, work, hwm=k))
        if "bp-gpipe" in o.variants:  # a step is k micro-batches: k times fewer steps keep the images per run alike
            specs.append(_spec(o, "bp-gpipe", "memory", o.layers, work, microbatches=k, steps=max(10, o.steps // k)))
    if o.in_flight and "ff-pipeline" in o.variants:  # run length: the same pipeline over 4x as many batches
        specs.append(_spec(o, "ff-pipeline", "memory", o.layers, work, steps=4 * o.steps))
    if o.to_accuracy:
        specs += [_spec(o, v, "accuracy", o.layers, work, to_accuracy=list(o.to_accuracy), negatives="hard") for v in o.variants]
    return specs


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _started_by(pid: int) -> set[int]:
    """Every process below `pid` or in its process group, from /proc (Linux; empty elsewhere). A launcher starts
    its layers in sessions of their own, so a signal to the run's process group alone does not reach them."""
    children: dict[int, list[int]] = {}
    group = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            _, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone while we looked
        me = int(stat.parent.name)
        children.setdefault(int(ppid), []).append(me)
        if int(pgrp) == pid:
            group.add(me)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return (found | group) - {pid}


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init, which may never reap it in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a run and every process it started: its process group and, found through /proc, the processes below
    it that live in sessions of their own. SIGTERM first (a launcher then stops its pipeline in order), SIGKILL
    for whatever is left after 5 s; returns once none of them runs (or 5 s after the SIGKILL)."""
    tree: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        tree |= _started_by(proc.pid)  # before the signal: an orphan is no longer below proc
        proc.send_signal(sig)  # a no-op once it has been reaped, so never a stranger that got its pid
        for pid in tree:
            try:
                os.kill(pid, sig)
            except OSError:
                pass  # gone already
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if proc.poll() is not None and not any(_running(pid) for pid in tree):
                return
            time.sleep(0.05)


def run_one(spec: dict, timeout_s: float) -> dict:
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec, indent=2))
    Path(spec["record"]).unlink(missing_ok=True)
    log = work / "log.txt"
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONUNBUFFERED": "1", "FFPIPE_BENCH_PID": str(os.getpid())}
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "ffpipe.benchrun", str(work / "spec.json")], stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout_s)
            error = None if rc == 0 else (_last_line(log) or f"exit code {rc}")
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:g}s"
        finally:
            _kill_group(proc)  # also on success: nothing it started may outlive it
    record = {"variant": spec["variant"], "kind": spec["kind"], "stages": len(spec["layers"]), "round": spec.get("round", 1), "ok": error is None,
              "error": error, "elapsed_s": round(time.perf_counter() - t0, 2), "log": str(log)}
    if error is None:
        try:
            record.update(json.loads(Path(spec["record"]).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            record.update(ok=False, error=f"no record written ({e})")
    procs = record.get("processes") or {}
    peaks = [p["peak_rss_mb"] for p in procs.values() if p.get("peak_rss_mb")]
    if peaks:
        record["peak_rss_mb_max"], record["peak_rss_mb_total"] = max(peaks), round(sum(peaks), 1)
    growth = [p["train_peak_rss_mb"] - p["rss_start_mb"] for p in procs.values() if p.get("train_peak_rss_mb") and p.get("rss_start_mb")]
    if growth:  # what steady training adds: peak after the first step minus RSS then, worst process
        record["growth_mb_max"] = round(max(growth), 1)
    busy = {name: p["busy"] for name, p in procs.items() if p.get("busy") is not None}
    if busy:
        record["busy"] = busy
    record["config"] = {k: v for k, v in spec.items() if k not in ("record", "work")}
    return record


def drop_checkpoints(work: Path) -> None:
    """Delete a finished run's trained weights. A pipelined run writes every layer's checkpoint and the assembled
    model, as the service does (3 GB over a bench of 3072-wide layers); the bench needs the run's figures, which
    its record, log, summary and metrics keep."""
    for f in work.rglob("*.pt"):
        f.unlink(missing_ok=True)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": usable_cores(), "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def derive(records: list[dict], cores: int) -> None:
    """Ratios against bp-inprocess and ff-inprocess at the same depth and in the same round, pipeline efficiency
    and speedups."""
    base = {(r["variant"], r["stages"], r.get("round", 1)): r.get("samples_per_s")
            for r in records if r["kind"] == "throughput" and r["ok"]}
    for r in records:
        if r["kind"] != "throughput" or not r["ok"] or not r.get("samples_per_s"):
            continue
        sps, depth, rnd = r["samples_per_s"], r["stages"], r.get("round", 1)
        bp, ff1 = base.get(("bp-inprocess", depth, rnd)), base.get(("ff-inprocess", depth, rnd))
        r["vs_bp_inprocess"] = round(sps / bp, 3) if bp else None
        r["vs_ff_inprocess"] = round(sps / ff1, 3) if ff1 else None
        if r["variant"] == "ff-pipeline" and ff1:
            workers = min(depth, cores) if r["config"]["device"] == "cpu" else depth
            r["pipeline_efficiency"] = round(sps / (workers * ff1), 3)
            if bp:  # FF does a positive and a negative pass per image: the ideal over L stages is L/2 x backprop
                r["vs_ideal_l_over_2_bp"] = round(sps / (workers / 2 * bp), 3)
    alone = {(r["stages"], r.get("round", 1)): r.get("processes", {}).get("main", {}).get("update_ms")
             for r in records if r["kind"] == "throughput" and r["ok"] and r["variant"] == "ff-inprocess"}
    for r in records:  # where a pipeline stage's time goes: each layer's update there, against the same one alone
        if r["kind"] == "throughput" and r["ok"] and r["variant"] == "ff-pipeline" and r.get("samples_per_s"):
            stages = _stage_times(r, alone.get((r["stages"], r.get("round", 1))))
            if stages:
                r["stage_times"] = stages
    ceilings = {}
    for r in records:  # k independent copies of ff-inprocess at once, each against one alone
        key = (r["stages"], r.get("round", 1))
        if r["kind"] == "ceiling" and r["ok"] and (ff1 := base.get(("ff-inprocess", *key))):
            r["alone_samples_per_s"] = ff1
            r["ceiling"] = ceilings[key] = round(sum(r["samples_per_s_each"]) / (len(r["samples_per_s_each"]) * ff1), 3)
    for r in records:
        if r.get("pipeline_efficiency") and (key := (r["stages"], r.get("round", 1))) in ceilings:
            r["parallel_ceiling"] = ceilings[key]
            r["efficiency_of_ceiling"] = round(r["pipeline_efficiency"] / ceilings[key], 3)


def _stage_times(r: dict, alone: list | None) -> list[dict]:
    """Per layer of an ff-pipeline run: its local update per batch (wall and CPU ms) there, the same layer's in
    the ff-inprocess run of that round, and the pipeline's time per batch. A stage whose update takes all of the
    time per batch is never waiting; the update's growth against alone is what sharing the machine costs it."""
    layers = [r.get("processes", {}).get(f"layer{i}", {}) for i in range(r["stages"])]
    if any(p.get("update_ms") is None for p in layers):
        return []  # a GPU run, or workers that did not report it
    batch_ms = r["config"]["batch_size"] * 1000 / r["samples_per_s"]
    out = []
    for i, p in enumerate(layers):
        row = {"layer": i, "pipeline_ms": p["update_ms"], "pipeline_cpu_ms": p.get("update_cpu_ms"),
               "batch_ms": round(batch_ms, 3), "share_of_batch": round(p["update_ms"] / batch_ms, 3)}
        if alone and i < len(alone) and alone[i]:
            row.update(inprocess_ms=alone[i], slowdown=round(p["update_ms"] / alone[i], 3))
        out.append(row)
    return out


SPREAD = ("samples_per_s", "vs_bp_inprocess", "vs_ff_inprocess", "pipeline_efficiency", "ceiling", "efficiency_of_ceiling")


def aggregate(records: list[dict]) -> list[dict]:
    """Over the rounds of --repeats: each throughput and ceiling figure's median, lowest and highest, per variant
    and depth. Ratios are taken within a round first, so they pair runs made close together in time."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["kind"] in ("throughput", "ceiling") and r["ok"]:
            groups.setdefault((r["kind"], r["variant"], r["stages"]), []).append(r)
    rows = []
    for (kind, variant, stages), rs in groups.items():
        row = {"kind": kind, "variant": variant, "stages": stages, "rounds": len(rs)}
        for field in SPREAD:
            if vals := [r[field] for r in rs if r.get(field) is not None]:
                row[field] = {"median": round(statistics.median(vals), 3), "min": min(vals), "max": max(vals)}
        rows.append(row)
    return rows


def write_markdown(path: Path, records: list[dict], o: BenchOptions, info: dict, command: str, stopped: str | None = None) -> None:
    L = []
    L.append(f"# ffpipe bench: {o.dataset}, layers {','.join(map(str, o.layers))}, batch {o.batch_size}, {o.threads} thread(s) per process\n")
    if stopped:
        L.append(f"**Stopped early**: these are the first {stopped}.\n")
    L.append(f"Machine: {info['cpu']}, {info['cores']} cores" + (f", GPUs: {', '.join(info['gpus'])}" if info.get("gpus") else "")
             + f"; torch {info['torch']}, Python {info['python']}. Devices: {o.devices}.\n")
    L.append(f"Command: `{command}`\n")
    L.append(f"Throughput: {o.steps} mini-batches per run (bp-gpipe/bp-1f1b: {o.steps} optimizer steps of m x {o.batch_size} images), "
             "(ff-pipeline: the whole epochs that hold as many images), the first 10% untimed; each training image counted once. Peak memory: each process's peak RSS; growth: peak after the first training step "
             "minus RSS at that point (Linux clear_refs), i.e. what steady training adds"
             + (" (GPU memory, each layer's peak allocated: peak_gpu_mb in bench.json)" if o.devices.startswith("cuda") else "") + ".\n")
    rows = [r for r in records if r["kind"] == "throughput"]
    if rows:
        L.append("## Throughput\n")
        rounds = o.repeats > 1
        L.append(("| round " if rounds else "") + "| variant | stages | m / queue | samples/s | x bp-inprocess | x ff-inprocess | pipeline efficiency | peak RSS MB (max / total) | busy per process |")
        L.append(("|---:" if rounds else "") + "|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in sorted(rows, key=lambda r: (r.get("round", 1), r["stages"], VARIANTS.index(r["variant"]))):
            L.append((f"| {r.get('round', 1)} " if rounds else "") + _row(r))
    if o.repeats > 1:
        L += _over_rounds(aggregate(records), o.repeats)
    ceiling = [r for r in records if r["kind"] == "ceiling"]
    if ceiling:
        L.append("\n## The machine's parallel ceiling\n")
        L.append("k copies of the single-process ff-inprocess run at once (k = the busy processes of a pipeline of that depth: "
                 "layers, or cores if fewer), started together after their warm-up and sharing nothing: the rate each "
                 "gets against one run alone. A pipeline of k busy processes also shares the cores, caches and memory "
                 "bandwidth, and adds the wire, so its efficiency is not expected above this ceiling.\n")
        L.append("| stages | round | copies | one alone (samples/s) | each of the copies at once (samples/s) | ceiling | ff-pipeline efficiency | efficiency / ceiling |")
        L.append("|---:|---:|---:|---:|---|---:|---:|---:|")
        pipes = {(r["stages"], r.get("round", 1)): r for r in rows if r["variant"] == "ff-pipeline" and r["ok"]}
        for r in sorted(ceiling, key=lambda r: (r["stages"], r.get("round", 1))):
            if not r["ok"]:
                L.append(f"| {r['stages']} | {r.get('round', 1)} | {r['config']['copies']} | failed: {r['error']} | | | | |")
                continue
            pipe = pipes.get((r["stages"], r.get("round", 1)), {})
            L.append(f"| {r['stages']} | {r.get('round', 1)} | {r['config']['copies']} | {_num(r.get('alone_samples_per_s'))} | "
                     f"{', '.join(_num(x) for x in r['samples_per_s_each'])} | {_num(r.get('ceiling'), '{:.2f}')} | "
                     f"{_num(pipe.get('pipeline_efficiency'), '{:.2f}')} | {_num(pipe.get('efficiency_of_ceiling'), '{:.2f}')} |")
    staged = [r for r in rows if r.get("stage_times")]
    if staged:
        L.append("\n## Where a pipeline stage's time goes\n")
        L.append("Each layer's local update per batch (`local_update`: forward, loss, backward, optimizer step), in ms: in "
                 "ff-inprocess (the layers one after another in one process) and in ff-pipeline (the layer alone in its "
                 "process; wall, and its thread's CPU), against the pipeline's time per batch (batch size / samples/s). "
                 "The update's share of that time is what the stage spends learning; the rest of the slowest stage's time "
                 "is receiving, decoding, sending and waiting. The slowdown is what running beside the other stages "
                 "(sharing cores, caches and memory bandwidth) does to the same update.\n")
        L.append("| round | stages | layer | update, ff-inprocess | update, ff-pipeline (wall / CPU) | slowdown | pipeline ms per batch | update / batch time |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(staged, key=lambda r: (r["stages"], r.get("round", 1))):
            for st in r["stage_times"]:
                L.append(f"| {r.get('round', 1)} | {r['stages']} | {st['layer']} | {_num(st.get('inprocess_ms'), '{:.1f}')} | "
                         f"{st['pipeline_ms']:.1f} / {_num(st.get('pipeline_cpu_ms'), '{:.1f}')} | {_num(st.get('slowdown'), '{:.2f}')} | "
                         f"{st['batch_ms']:.1f} | {st['share_of_batch']:.2f} |")
    wire = [r for r in records if r["kind"] == "wire"]
    if wire:
        L.append("\n## The wire's share of a stage\n")
        L.append("One process, one thread: encode + send + receive + decode of one train message (positives and negatives of a "
                 "batch at the layer's width) over loopback ZeroMQ, decoded and checked as a layer worker does (the update's "
                 "inputs by its loss), against that layer's local update (width x width).\n")
        L.append("| width | batch | message MB | wire ms | layer step ms | wire / step |")
        L.append("|---:|---:|---:|---:|---:|---:|")
        for r in wire:
            if r["ok"]:
                L.append(f"| {r['config']['layers'][-1]} | {r['config']['batch_size']} | {r['message_mb']} | {r['wire_ms']:.3f} | "
                         f"{r['compute_ms']:.3f} | {r['wire_fraction']:.1%} |")
            else:
                L.append(f"| {r['config']['layers'][-1]} | {r['config']['batch_size']} | failed: {r['error']} | | | |")
    mem = [r for r in records if r["kind"] == "memory"] + [r for r in rows if r["variant"] in ("ff-pipeline", "bp-gpipe")
                                                           and r["stages"] == len(o.layers) and r.get("round", 1) == 1]
    if any(r["kind"] == "memory" for r in mem):
        L.append("\n## Memory against batches in flight\n")
        L.append("ff-pipeline: the queue depth FFPIPE_HWM of every link (default 2); bp-gpipe: m micro-batches of "
                 f"{o.batch_size} images per step. Run length: batches trained (a bp-gpipe step of m micro-batches counts once; "
                 "ff-pipeline trains whole epochs, so past one epoch of images it runs a little longer than asked).\n")
        L.append("| variant | in flight (queue / m) | run length | peak RSS MB per process (max) | total | growth in training MB (max) | samples/s |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in sorted(mem, key=lambda r: (r["variant"], _inflight(r), r["config"]["steps"])):
            peak = f"{r['peak_rss_mb_max']:,.0f}" if r.get("peak_rss_mb_max") else "-"
            total = f"{r['peak_rss_mb_total']:,.0f}" if r.get("peak_rss_mb_total") else "-"
            L.append(f"| {r['variant']} | {_inflight(r)} | {r.get('train_batches') or r['config']['steps']} | {peak} | {total} | {_num(r.get('growth_mb_max'), '{:,.1f}')} | {_num(r.get('samples_per_s'))} |"
                     + ("" if r["ok"] else f" failed: {r['error']} |"))
    acc = [r for r in records if r["kind"] == "accuracy"]
    if acc:
        targets = o.to_accuracy
        L.append("\n## Wall time to test accuracy\n")
        L.append("Wall time from the start of training, per-epoch evaluation included; FF variants use the hinton recipe "
                 "(hard negatives), backprop uses Adam.\n")
        L.append("| variant | " + " | ".join(f"to {t:.2%}" for t in targets) + " | best accuracy | epochs |")
        L.append("|---|" + "---:|" * (len(targets) + 2))
        for r in acc:
            if not r["ok"]:
                L.append(f"| {r['variant']} | failed: {r['error']} |")
                continue
            hist = r.get("history") or []
            cells = [f"{r['time_to_accuracy_s'][str(t)]:,.0f} s" if str(t) in r.get("time_to_accuracy_s", {}) else "not reached" for t in targets]
            best = max((h["accuracy"] for h in hist), default=float("nan"))
            L.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {best:.4f} | {len(hist)} |")
    failed = [r for r in records if not r["ok"]]
    if failed:
        L.append("\n## Runs that failed\n")
        L += [f"- {r['variant']} ({r['kind']}, {r['stages']} stages): {r['error']}" for r in failed]
    path.write_text("\n".join(L) + "\n")


def _over_rounds(rows: list[dict], repeats: int) -> list[str]:
    """The median and range of each figure over the rounds."""
    def cell(row, field, fmt):
        f = row.get(field)
        if not f:
            return "-"
        return fmt.format(f["median"]) + ("" if f["min"] == f["max"] else f" ({fmt.format(f['min'])}-{fmt.format(f['max'])})")

    L = ["\n## Over the rounds\n",
         f"{repeats} rounds of every throughput and ceiling run, interleaved (every other round in reverse order); each ratio "
         "is taken within its round, against the runs made in that round. Median (lowest-highest).\n",
         "| variant | stages | rounds | samples/s | x bp-inprocess | x ff-inprocess | pipeline efficiency | parallel ceiling | efficiency / ceiling |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["stages"], r["kind"] == "ceiling", VARIANTS.index(r["variant"]))):
        name = row["variant"] + (", copies at once (ceiling)" if row["kind"] == "ceiling" else "")
        sps = "-" if row["kind"] == "ceiling" else cell(row, "samples_per_s", "{:,.0f}")
        L.append(f"| {name} | {row['stages']} | {row['rounds']} | {sps} | {cell(row, 'vs_bp_inprocess', '{:.2f}')} | "
                 f"{cell(row, 'vs_ff_inprocess', '{:.2f}')} | {cell(row, 'pipeline_efficiency', '{:.2f}')} | "
                 f"{cell(row, 'ceiling', '{:.2f}')} | {cell(row, 'efficiency_of_ceiling', '{:.2f}')} |")
    return L


def _inflight(r: dict) -> int:
    return r["config"]["hwm"] if r["variant"] == "ff-pipeline" else r["config"]["microbatches"]


def _num(x, fmt="{:,.0f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def _row(r: dict) -> str:
    if not r["ok"]:
        return f"| {r['variant']} | {r['stages']} | | failed: {r['error']} | | | | | |"
    m = r["config"]["microbatches"] if r["variant"] in ("bp-gpipe", "bp-1f1b") else (r["config"]["hwm"] if r["variant"] == "ff-pipeline" else "")
    busy = ", ".join(f"{k} {v:.2f}" for k, v in r.get("busy", {}).items())
    peak = f"{r.get('peak_rss_mb_max', 0):,.0f} / {r.get('peak_rss_mb_total', 0):,.0f}"
    return (f"| {r['variant']} | {r['stages']} | {m} | {_num(r.get('samples_per_s'))} | {_num(r.get('vs_bp_inprocess'), '{:.2f}')} | "
            f"{_num(r.get('vs_ff_inprocess'), '{:.2f}')} | {_num(r.get('pipeline_efficiency'), '{:.2f}')} | {peak} | {busy} |")


def plot(out: Path, records: list[dict], o: BenchOptions) -> list[str]:
    """PNG plots of what was measured; returns the files written (none, with a note, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("ffpipe bench: matplotlib is not installed (pip install 'ffpipe[bench]'); skipping the plots", file=sys.stderr)
        return []
    written = []
    rows = [r for r in records if r["kind"] == "throughput" and r["ok"] and r.get("samples_per_s")]
    if rows:
        depths = sorted({r["stages"] for r in rows})
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(depths))
        for k, d in enumerate(depths):
            ys = [statistics.median([r["samples_per_s"] for r in rows if r["variant"] == v and r["stages"] == d] or [0]) for v in variants]
            ax.bar([i + k * width for i in range(len(variants))], ys, width, label=f"{d} stage{'s' if d > 1 else ''}")
        ax.set_xticks([i + width * (len(depths) - 1) / 2 for i in range(len(variants))], variants)
        ax.set_ylabel("training samples/s")
        ax.set_title(f"{o.dataset}, width {o.layers[0]}, batch {o.batch_size}, {o.threads} thread(s)/process")
        ax.legend()
        written.append(_save(fig, out / "throughput.png", plt))
    mem = [r for r in records if r["ok"] and r.get("growth_mb_max") is not None
           and not (r["variant"] == "ff-pipeline" and r["config"]["steps"] != o.steps)
           and len(r["config"]["layers"]) == len(o.layers) and r["variant"] in ("ff-pipeline", "bp-gpipe") and r["kind"] in ("memory", "throughput")
           and r.get("round", 1) == 1]  # one point per queue depth, not one per --repeats round
    if any(r["kind"] == "memory" for r in mem):
        fig, ax = plt.subplots(figsize=(6, 4))
        for v, label in (("ff-pipeline", "ff-pipeline (queue depth)"), ("bp-gpipe", "bp-gpipe (micro-batches m)")):
            pts = sorted({_inflight(r): r["growth_mb_max"] for r in mem if r["variant"] == v}.items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("batches in flight")
        ax.set_ylabel("memory added by training, worst process (MB)")
        ax.set_xscale("log", base=2)
        ax.legend()
        written.append(_save(fig, out / "memory.png", plt))
    acc = [r for r in records if r["kind"] == "accuracy" and r["ok"] and r.get("history")]
    if acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in acc:
            hist = [h for h in r["history"] if h.get("split", "test") == "test"]
            ax.plot([h["wall_s"] for h in hist], [h["accuracy"] for h in hist], marker=".", label=r["variant"])
        for t in o.to_accuracy:
            ax.axhline(t, color="grey", lw=0.5, ls="--")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("test accuracy")
        ax.legend()
        written.append(_save(fig, out / "accuracy.png", plt))
    return written


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_one's cleanup, as Ctrl-C does


def _describe(spec: dict, i: int, n: int) -> str:
    what = f"[{i}/{n}] {spec['kind']:<10} {spec['variant']:<12} {len(spec['layers'])} stage(s)"
    if spec["variant"] in ("bp-gpipe", "bp-1f1b"):
        what += f", m={spec['microbatches']}"
    if spec["variant"] == "ff-pipeline":
        what += f", queue {spec['hwm']}"
    if spec["kind"] == "ceiling":
        what += f", {spec['copies']} copies at once"
    if spec.get("rounds", 1) > 1 and spec["kind"] in ("throughput", "ceiling"):
        what += f", round {spec['round']} of {spec['rounds']}"
    return what


def _report(r: dict, what: str, echo) -> None:
    if not r["ok"]:
        echo(f"{what}: FAILED: {r['error']}")
    elif r["kind"] == "accuracy":
        echo(f"{what}: time to accuracy {r.get('time_to_accuracy_s')} ({r['elapsed_s']:.0f}s)")
    elif r["kind"] == "ceiling":
        echo(f"{what}: {', '.join(_num(x) for x in r['samples_per_s_each'])} samples/s each, {r['config']['copies']} at once "
             f"({r['elapsed_s']:.0f}s)")
    elif r["kind"] == "wire":
        echo(f"{what}: wire {r['wire_ms']:.2f} ms per message vs layer step {r['compute_ms']:.2f} ms ({r['wire_fraction']:.1%})")
    else:
        echo(f"{what}: {_num(r.get('samples_per_s'))} samples/s, peak RSS {_num(r.get('peak_rss_mb_max'))} MB max / "
             f"{_num(r.get('peak_rss_mb_total'))} MB total ({r['elapsed_s']:.0f}s)")


def bench(o: BenchOptions, command: str = "ffpipe bench", echo=print) -> dict:
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = plan(o)
    info = machine()
    echo(f"ffpipe bench: {len(specs)} runs on {o.dataset} ({', '.join(o.variants)}); layers {list(o.layers)}, batch {o.batch_size}, "
         f"{o.threads} thread(s) per process, {info['cores']} cores; writing {out}/")
    records, stopped = [], None
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for i, spec in enumerate(specs, 1):
            try:
                r = run_one(spec, o.accuracy_timeout_s if spec["kind"] == "accuracy" else o.timeout_s)
            finally:  # also for the run a Ctrl-C or SIGTERM stopped: run_one has stopped its processes by now
                if not o.keep_checkpoints:
                    drop_checkpoints(Path(spec["work"]))
            records.append(r)
            _report(r, _describe(spec, i, len(specs)), echo)
    except (KeyboardInterrupt, SystemExit) as e:  # stopped (Ctrl-C, SIGTERM): keep what was measured, then exit
        stopped = e
        echo(f"ffpipe bench: stopped after {len(records)} of {len(specs)} runs; writing those")
    finally:
        signal.signal(signal.SIGTERM, previous)
    derive(records, info["cores"] or 1)
    result = {"options": asdict(o), "command": command, "machine": info, "records": records, "over_rounds": aggregate(records),
              "stopped_after": None if stopped is None else f"{len(records)} of {len(specs)} runs"}
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "bench.json")
    write_markdown(out / "bench.md", records, o, info, command, result["stopped_after"])
    for old in PLOTS:  # an earlier bench's plot that this one does not draw would sit beside the new bench.md
        (out / old).unlink(missing_ok=True)
    plots = plot(out, records, o)
    echo(f"ffpipe bench: wrote {out}/bench.json, bench.md" + (", " + ", ".join(Path(p).name for p in plots) if plots else ""))
    if stopped is not None:
        raise stopped
    return result
