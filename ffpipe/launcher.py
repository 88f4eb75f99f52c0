"""The launcher: starts the source, one worker per layer and the sink as OS processes, and watches them.

It owns no sockets. It picks free loopback ports, writes run.json, and starts every role as
`python -m ffpipe run --role ...` with the same config file. Ctrl-C or SIGTERM becomes an in-band stop: the
source stops sending batches and sends `stop`, which checkpoints each layer on its way to the sink. A child
that dies makes the launcher stop the rest and fail with one line naming it; with `restart="on-failure"` it
is started again from its checkpoint instead (up to `max_restarts` times per role), and the source resends
what the crash lost. Children die with the launcher.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ffpipe import checkpoint
from ffpipe.config import RunConfig
from ffpipe.data import Data, input_stats
from ffpipe.layer import check_net, out_widths
from ffpipe.metrics import write_json
from ffpipe.source import EVAL_BATCH, WHITENING
from ffpipe.topology import Topology
from ffpipe.transport import MAX_MSG_BYTES, STOPPED_ALONE
from ffpipe.wire import MAX_TENSOR_BYTES

STOP_GRACE_S = 10.0  # after a stop request, how long the pipeline may take to drain before it is killed
STOP_PASS_GRACE_S = 10.0  # a layer gone this long while the role after it, restarted, lacks the stop: start it again


class PipelineError(Exception):
    """A role of the pipeline failed; the message names it."""


@dataclass
class Child:
    role: str
    index: int | None
    device: str
    proc: subprocess.Popen
    told_the_rest: bool = False  # the source died of the stop's SIGTERM before sending the stop: the rest were told

    @property
    def name(self) -> str:
        return self.role if self.index is None else f"{self.role} {self.index}"


def resolve_devices(spec: str, num_layers: int) -> list[str]:
    """'cpu' | 'cuda' (layer i on GPU i mod n) | an explicit comma-separated list, one per layer (or one for all)."""
    if spec == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("--devices cuda: no CUDA device is visible")
        return [f"cuda:{i % n}" for i in range(num_layers)]
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1:
        parts *= num_layers
    if len(parts) != num_layers:
        raise ValueError(f"--devices lists {len(parts)} devices for {num_layers} layers")
    for p in parts:
        try:
            torch.device(p)
        except RuntimeError as e:
            raise ValueError(f"--devices: {p!r} is not a torch device") from e
    return parts


STALE = ("layer*.pt", "readout.pt", "sink.pt", WHITENING, "run.json", "summary.json", "checkpoint.pt", "metrics.jsonl")


def die_with_launcher(variable: str = "FFPIPE_LAUNCHER_PID") -> None:
    """Called at start-up by a process that a launcher (or the bench) started, whose pid is in `variable`:
    get SIGTERM when that parent dies (Linux), and exit at once if it is already gone."""
    parent = os.environ.get(variable)
    if not parent:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        sys.exit("ffpipe: the process that started this one is gone")


def check_message_sizes(cfg: RunConfig, widths: list[int], num_classes: int, train_images: int) -> None:
    """Refuse, before any process starts, a run whose layers would forward messages over the wire's caps: each
    would apply its batch and then fail to send it on. Train messages carry B rows per tensor (positive, negative
    and, for the readout, neutral); evaluation messages EVAL_BATCH images, each once per label with the overlay."""
    overlay = not cfg.competitive
    tensors = 2 if overlay else 1
    if overlay and cfg.uses_readout:
        tensors += 1
    for i, width in enumerate(widths):
        for kind, rows in (("train", min(cfg.batch_size, train_images)), ("evaluation", EVAL_BATCH * (num_classes if overlay else 1))):
            one = rows * width * 4  # float32
            if one > MAX_TENSOR_BYTES or one * tensors > MAX_MSG_BYTES:
                fix = "a smaller --batch-size" if kind == "train" else "narrower layers"
                raise ValueError(f"layer {i} would forward {kind} messages of {rows:,} x {width:,} floats ({one / 2**20:,.0f} MB a "
                                 f"tensor), over the wire's caps ({MAX_TENSOR_BYTES >> 20} MB a tensor, {MAX_MSG_BYTES >> 20} MB a "
                                 f"message): use {fix}")


class Launcher:
    def __init__(self, cfg: RunConfig, data: Data, devices: list[str], threads: int, show_progress: bool = True,
                 resume: bool = False, pin: bool = False, keys=None, restart: str = "no", max_restarts: int = 3):
        if restart not in ("no", "on-failure"):
            raise ValueError(f"--restart must be no or on-failure; got {restart!r}")
        if max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0; got {max_restarts}")
        # what a layer process would refuse at its first batch, refused here before any process starts
        shapes = check_net(cfg.layers, data.shape, data.num_classes, cfg.competitive)
        check_message_sizes(cfg, [math.prod(out) for _, _, out in shapes], data.num_classes, len(data.train))
        self.restart, self.max_restarts = restart, max_restarts
        self.restarts: dict[str, int] = {}
        self.cfg, self.data, self.devices, self.threads = cfg, data, devices, threads
        self.keys = keys
        self.cores = pin_plan([spec.macs(shape) for spec, shape, _ in shapes]) if pin else {}
        self.out = Path(cfg.out)
        self.show_progress = show_progress
        self.children: list[Child] = []
        self.stop_requested_at: float | None = None
        self.gone_at: dict[int, float] = {}  # pid of a layer that exited 0 -> when the launcher first saw it gone
        self.stop_passed: set[int] = set()  # pids of restarted roles whose missing final stop has been seen to
        self.resume = resume

    def _spawn(self, role: str, index: int | None, device: str, flags: list[str], resume: bool = False) -> Child:
        cmd = [sys.executable, "-m", "ffpipe", "run", "--role", role, *flags]
        if (resume or self.restarts.get(role if index is None else f"{role} {index}")) and "--resume-role" not in cmd:
            cmd.append("--resume-role")  # a restart continues from the role's checkpoint
        if index is not None:
            cmd += ["--index", str(index)]
        if role == "layer":
            cmd += ["--device", device, "--threads", str(self.threads)]
        if not self.show_progress:  # -q: every role keeps to warnings and errors, as the in-process trainer does
            cmd += ["--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1", "FFPIPE_LAUNCHER_PID": str(os.getpid())}
        # its own session: a terminal's Ctrl-C or `timeout` signals the launcher's process group, and the launcher
        # alone orders the stop (the source stops sending, the pipeline drains, every layer checkpoints); a child
        # still dies with the launcher (die_with_launcher)
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        cores = self.cores.get(role if index is None else f"{role}{index}")
        if cores:  # before the child starts its threads (torch, ZeroMQ), which inherit the mask
            try:
                os.sched_setaffinity(proc.pid, cores)
            except OSError:
                pass
        return Child(role, index, device, proc)

    def run(self) -> dict:
        cfg = self.cfg
        if cfg.schedule != "joint":
            raise ValueError("the pipeline trains every layer on every batch: use --schedule joint, or --inprocess for greedy")
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume:  # a fresh run must not pick up another run's layers, readout or summary
            for pattern in STALE:
                for path in self.out.glob(pattern):
                    path.unlink()
        topo = Topology.local(len(cfg.layers), keys=self.keys)
        d = self.data
        eval_split = d.val if d.val is not None else d.test
        if self.show_progress:
            print(f"ffpipe: pipeline {cfg.preset} run on {d.name} ({len(d.train):,} train, {len(eval_split):,} "
                  f"{'val' if d.val is not None else 'test'}) from {d.source}; layers {list(cfg.layers)}, batch {cfg.batch_size}, "
                  f"{cfg.epochs} epochs; source + {len(cfg.layers)} layer processes ({', '.join(self.devices)}, {self.threads} "
                  f"thread{'s' if self.threads > 1 else ''} each) + sink; run folder {self.out}"
                  + ("; resuming" if self.resume else ""), file=sys.stderr, flush=True)
        (self.out / "config.json").write_text(cfg.to_json())
        flags = ["--config", str(self.out / "config.json"), "--out", str(self.out), *topo.as_flags()]
        if self.resume:
            flags.append("--resume-role")
        self.flags, self.topo = flags, topo
        # downstream first: nothing depends on it, but it makes the first batches flow without retries
        self.children.append(self._spawn("sink", None, "cpu", flags))
        for i in reversed(range(len(cfg.layers))):
            self.children.append(self._spawn("layer", i, self.devices[i], flags))
        self.children.append(self._spawn("source", None, "cpu", flags))
        self.started_at = time.time()
        self._write_run_json()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            stopped = self._watch()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._kill_all()
        if stopped:
            held = all((self.out / f"layer{i}.pt").is_file() for i in range(len(self.cfg.layers)))
            if held:
                self.assemble_checkpoint()
            why = "stopped on request" if self.stop_requested_at is not None else "the source was stopped by a signal of its own"
            raise PipelineError(f"{why} before the run finished; " + (
                f"{self.out / checkpoint.FILENAME} holds the layers as they stopped (ffpipe eval), " if held else "")
                + f"--resume {self.out} continues the run")
        self.assemble_checkpoint()
        summary = json.loads((self.out / "summary.json").read_text())
        if self.restart != "no":
            summary["restarts"] = self.restarts
        if summary.get("test_accuracy") is None and not summary.get("interrupted", True) and self.data.val is not None:
            summary.update(self._test_once())
        write_json(self.out / "summary.json", summary)
        return summary

    def _test_once(self) -> dict:
        """A run that evaluated on a validation hold-out meets the test set once, at the end (as in-process runs
        do): the assembled checkpoint, evaluated here in one process."""
        from ffpipe.model import evaluate
        from ffpipe.serve import load_model

        t0 = time.perf_counter()
        net, _ = load_model(self.out, self.devices[0])  # the first layer's device: a GPU when the run had one
        accuracy = evaluate(net, self.data.test.x, self.data.test.y)["accuracy"]
        if self.show_progress:
            print(f"ffpipe: test accuracy {accuracy:.4f} (the assembled checkpoint, evaluated once after training)", flush=True)
        return {"test_accuracy": accuracy, "test_eval_s": round(time.perf_counter() - t0, 2)}

    def _write_run_json(self) -> None:
        """Every process of the run (rewritten when one is restarted, with its new pid)."""
        topo = self.topo
        endpoints = {"source": str(topo.source), "sink": str(topo.sink), **{f"layer {i}": str(e) for i, e in enumerate(topo.layers)}}
        write_json(self.out / "run.json", {
            "mode": "pipeline", "launcher_pid": os.getpid(), "started_at": self.started_at, "topology": topo.to_dict(),
            "restart": self.restart, "restarts": self.restarts,
            "processes": [{"role": c.role, "index": c.index, "pid": c.proc.pid, "device": c.device, "endpoint": endpoints.get(c.name)}
                          for c in self.children],
        })

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            print(f"ffpipe: {signal.Signals(signum).name}: stopping the pipeline (checkpoints are kept)", file=sys.stderr, flush=True)
            source = next(c for c in self.children if c.role == "source")
            if source.proc.poll() is None:
                source.proc.send_signal(signal.SIGTERM)
            else:  # everything is already sent: the pipeline drains as it would have, for STOP_GRACE_S at most
                print(f"ffpipe: the source has sent everything; letting the pipeline finish (at most {STOP_GRACE_S:g}s)",
                      file=sys.stderr, flush=True)

    def _stopped(self, c: Child, rc: int) -> bool:
        """During a stop the launcher asked for, a child that SIGTERM ended counts as stopped, not dead: one that
        had not yet set up its handler (a busy machine, a role still importing torch) dies of it."""
        return self.stop_requested_at is not None and rc in (-signal.SIGTERM, STOPPED_ALONE)

    def _watch(self) -> bool:
        """Until every child has exited; True when they stopped before the run finished: on the launcher's request,
        or at an interrupted stop from the source, which a signal of its own makes it send."""
        while True:
            for k, c in enumerate(self.children):
                rc = c.proc.poll()
                if rc is not None and self._stopped(c, rc):
                    if c.role == "source" and rc == -signal.SIGTERM and not c.told_the_rest:  # no in-band stop went out
                        c.told_the_rest = True
                        for other in self.children:
                            if other.proc.poll() is None:
                                other.proc.send_signal(signal.SIGTERM)  # a layer saves its checkpoint, then exits
                    continue
                if rc is not None and rc != 0:
                    what = (f"killed by {signal.Signals(-rc).name}" if rc < 0 else "stopped by a SIGTERM of its own before the run's end"
                            if rc == STOPPED_ALONE and c.role != "source" else f"exit code {rc}")
                    done = self.restarts.get(c.name, 0)
                    if self.restart == "on-failure" and self.stop_requested_at is None and done < self.max_restarts:
                        self.restarts[c.name] = done + 1
                        print(f"ffpipe: {c.name} (pid {c.proc.pid}) died: {what}; restarting it from its checkpoint "
                              f"(restart {done + 1} of {self.max_restarts})", file=sys.stderr, flush=True)
                        self.children[k] = self._spawn(c.role, c.index, c.device, self.flags)
                        self._write_run_json()
                        continue
                    after = f" after {done} restart{'s' if done != 1 else ''}" if done else ""
                    raise PipelineError(f"{c.name} (pid {c.proc.pid}) died: {what}{after}; stopped the rest")
            self._pass_the_stop_again()
            if all(c.proc.poll() == 0 or (c.proc.poll() is not None and self._stopped(c, c.proc.poll())) for c in self.children):
                summary = self.out / "summary.json"
                return not summary.is_file() or json.loads(summary.read_text()).get("interrupted", True)
            if self.stop_requested_at is not None and time.monotonic() - self.stop_requested_at > STOP_GRACE_S:
                alive = [c.name for c in self.children if c.proc.poll() is None]
                raise PipelineError(f"stop requested but {', '.join(alive)} did not finish within {STOP_GRACE_S:g}s; killed")
            time.sleep(0.1)  # polling child processes, not synchronizing with them

    def _pass_the_stop_again(self) -> None:
        """A layer (after the first) or the sink restarted in the run's final stop, after the layer before it had
        passed the stop on and exited: no one would send it again (the source resends it to layer 0 only). Once
        that layer has been gone STOP_PASS_GRACE_S (time for a restarted role that did get the stop to keep it)
        and the restarted role's checkpoint still lacks the stop, the layer is started again: its checkpoint holds
        the stop, which it forwards, and it exits. Decided once per restarted process."""
        now = time.monotonic()
        for restarted in self.children:
            if (restarted.name not in self.restarts or restarted.role == "source" or restarted.index == 0
                    or restarted.proc.poll() is not None or restarted.proc.pid in self.stop_passed):
                continue  # the source resends an unconfirmed stop to layer 0 itself
            up = len(self.cfg.layers) - 1 if restarted.role == "sink" else restarted.index - 1
            k, before = next((k, c) for k, c in enumerate(self.children) if c.role == "layer" and c.index == up)
            if before.proc.poll() != 0:
                continue  # still there to forward the stop when it comes
            if now - self.gone_at.setdefault(before.proc.pid, now) < STOP_PASS_GRACE_S:
                continue
            self.stop_passed.add(restarted.proc.pid)
            own = self.out / ("sink.pt" if restarted.role == "sink" else f"layer{restarted.index}.pt")
            if holds_final_stop(own) or not holds_final_stop(self.out / f"layer{up}.pt"):
                continue  # it has the stop; or the layer before left without the final stop (an interrupted run)
            print(f"ffpipe: {before.name} had passed the run's stop on and exited; starting it again to pass the stop "
                  f"to the restarted {restarted.name}", file=sys.stderr, flush=True)
            self.children[k] = self._spawn(before.role, before.index, before.device, self.flags, resume=True)
            self._write_run_json()

    def _kill_all(self) -> None:
        alive = [c for c in self.children if c.proc.poll() is None]
        for c in alive:
            c.proc.terminate()
        deadline = time.monotonic() + 5
        for c in alive:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()

    def assemble_checkpoint(self) -> None:
        assemble_checkpoint(self.out, self.cfg, self.data)


def holds_final_stop(path: Path) -> bool:
    """Whether a layer's or the sink's checkpoint holds the run's final stop (not an interrupted one)."""
    try:
        stop = checkpoint.load(path).get("stop") if path.is_file() else None
    except (checkpoint.CheckpointError, OSError):
        return False
    return bool(stop) and not stop.get("source.interrupted")


def assemble_checkpoint(out: Path, cfg: RunConfig, data: Data) -> Path:
    """Layer checkpoints + the sink's readout -> one checkpoint.pt in `out` that `ffpipe eval`/`predict` load: the
    launcher's last step, and `ffpipe eval`'s for a run whose roles ran apart (compose, Kubernetes, several hosts).
    `data`: the run's dataset after its hold-out, whose training images give the input statistics."""
    state = {}
    for i in range(len(cfg.layers)):
        part = checkpoint.load(out / f"layer{i}.pt")
        state.update({f"layers.{i}.{k}": v for k, v in part["layer"].items()})
    readout = out / "readout.pt"
    width = sum(out_widths(cfg.layers, data.shape)[cfg.first_readout :])
    use_readout = cfg.uses_readout and readout.is_file()
    state["readout.weight"] = checkpoint.load(readout)["readout"]["weight"] if use_readout else torch.zeros(data.num_classes, width)
    mean, std = input_stats(data, cfg.standardize, cfg.equalize)
    state.update(input_mean=mean, input_std=std)
    if cfg.whiten:  # the source fitted it (and saved it) before the first batch
        saved = checkpoint.load(out / WHITENING)
        state.update(whiten_center=saved["center"], whiten_matrix=saved["matrix"])
    path = out / checkpoint.FILENAME
    checkpoint.save(path, {
        "config": cfg.to_json(), "model": state, "epoch": cfg.epochs,
        "data": {"name": data.name, "shape": list(data.shape), "classes": data.classes},
    })
    return path

def pin_plan(costs: list[float], cores: list[int] | None = None) -> dict[str, set[int]]:
    """--pin: layer i on core i mod n of the cores this process may use (or `cores`); the source and the sink
    share the core whose layers cost least (`costs`, one per layer: `LayerSpec.macs`), so the busiest layer's core
    runs nothing else. Each layer then owns a core as long as there are at least as many cores as layers, instead
    of the scheduler moving busy layers and ZeroMQ's I/O threads between cores. Linux only."""
    if cores is None:
        if not hasattr(os, "sched_getaffinity"):
            return {}
        cores = sorted(os.sched_getaffinity(0))
    plan = {f"layer{i}": {cores[i % len(cores)]} for i in range(len(costs))}
    load = {core: sum(c for i, c in enumerate(costs) if i % len(cores) == k) for k, core in enumerate(cores)}
    lightest = min(cores[: len(costs)], key=lambda core: load[core])  # a core with a layer (cores may outnumber them)
    plan["source"] = plan["sink"] = {lightest}
    return plan


def launch(cfg: RunConfig, data: Data, devices: str = "cpu", threads: int = 1, show_progress: bool = True,
           resume: bool = False, pin: bool = False, keys=None, restart: str = "no", max_restarts: int = 3) -> dict:
    return Launcher(cfg, data, resolve_devices(devices, len(cfg.layers)), threads, show_progress, resume, pin, keys,
                    restart, max_restarts).run()
