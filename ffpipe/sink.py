"""The sink role: the end of the pipeline. Accuracy, metrics, the readout, progress and the run summary.

Sockets: PULL, binds the sink address (the last layer's outputs, with every layer's metrics in-band).
         PUSH, connects to the source (readout beliefs for hard negatives; only with hard negatives).

Every message the source sent is accounted for here: train batches (with each layer's loss and goodness in
their scalars), evaluation batches (per-label goodness summed by the layers on the way), and the stop
message, which carries each role's counts and peak memory.
"""

from __future__ import annotations

import json
import resource
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import zmq
from torch import nn

from ffpipe import checkpoint, ff, transport
from ffpipe.config import RunConfig
from ffpipe.layer import make_optimizer, set_lr
from ffpipe.metrics import TARGETS, MetricsWriter, write_json
from ffpipe.progress import RunProgress
from ffpipe.topology import Topology
from ffpipe.wire import Message, WireError

POLL_MS = 250


class Sink:
    def __init__(self, cfg: RunConfig, topo: Topology, out: Path, peer_timeout_s: float = 120.0, show_progress: bool = True,
                 resume: bool = False):
        self.cfg, self.topo, self.out = cfg, topo, Path(out)
        self.timeout_ms = int(peer_timeout_s * 1000)
        self.readout: nn.Linear | None = None
        self.readout_opt = None
        self.epoch = -1
        self.received = {"train": 0, "eval": 0}
        self.samples = 0
        self.rejected: dict[str, int] = {}
        self.rounds: dict[int, dict] = {}
        self.history: list[dict] = []
        self.time_to: dict[str, float] = {}
        self.t_first: float | None = None  # arrival of the first train batch
        self.t_last = 0.0
        self.samples_after_first = 0
        self.arrivals: list[tuple[float, int]] = []  # (time, images) per train batch, for the steady-state rate
        self.stopping = False
        self.show_progress = show_progress
        self.resume = resume
        if resume:
            self._load()

    def _load(self) -> None:
        """Continue a stopped run: its readout, evaluation history and times to accuracy."""
        path = self.out / "readout.pt"
        if path.is_file():
            payload = checkpoint.load(path)
            w = payload["readout"]["weight"]
            self.readout = nn.Linear(w.shape[1], w.shape[0], bias=False)
            self.readout.load_state_dict(payload["readout"])
            self.readout_opt = make_optimizer(self.readout.parameters(), self.cfg.readout_optim)
            self.readout_opt.load_state_dict(payload["optimizer"])
        summary = self.out / "summary.json"
        if summary.is_file():
            previous = json.loads(summary.read_text())
            self.history, self.time_to = previous.get("history", []), previous.get("time_to_accuracy_s", {})

    # ---- readout (trained here, on the features the layers appended)

    def _readout_step(self, msg: Message, classes: int) -> torch.Tensor:
        feats, y = msg.tensors["feats"], msg.tensors["y"]
        width = sum(self.cfg.layers[self.cfg.first_readout :])
        if feats.dtype != torch.float32 or feats.shape != (len(y), width):
            raise ValueError(f"feats must be float32 ({len(y)}, {width}), got {feats.dtype} {tuple(feats.shape)}")
        if self.readout is None:
            torch.manual_seed(self.cfg.seed)
            self.readout = nn.Linear(width, classes, bias=False)
            nn.init.zeros_(self.readout.weight)
            self.readout_opt = make_optimizer(self.readout.parameters(), self.cfg.readout_optim)
        if msg.epoch != self.epoch:
            self.epoch = msg.epoch
            r = self.cfg.readout_optim
            set_lr(self.readout_opt, r.lr * ff.lr_factor(msg.epoch, self.cfg.epochs, r.schedule))
        logits = self.readout(feats)
        loss = F.cross_entropy(logits, y)
        self.readout_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.readout_opt.step()
        return logits.detach()

    # ---- message handlers

    @staticmethod
    def _labels(msg: Message) -> tuple[torch.Tensor, int]:
        """The message's labels, checked: (B,) int64 in [0, classes), B >= 1."""
        y, classes = msg.tensors["y"], msg.scalars.get("classes")
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
            raise ValueError(f"'classes' must be an integer >= 2, got {classes!r}")
        if y.dtype != torch.int64 or y.ndim != 1 or len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= classes:
            raise ValueError(f"y must be non-empty int64 labels in [0, {classes}), got {y.dtype} {tuple(y.shape)}")
        return y, classes

    def on_train(self, msg: Message, metrics: MetricsWriter, beliefs: zmq.Socket | None, progress: RunProgress) -> None:
        y, classes = self._labels(msg)
        if "feats" in msg.tensors:
            logits = self._readout_step(msg, classes)
        now = time.perf_counter()
        n = len(y)
        if self.t_first is None:
            self.t_first = now
        else:
            self.samples_after_first += n
        self.t_last = now
        self.arrivals.append((now, n))
        self.received["train"] += 1
        self.samples += n
        if "feats" in msg.tensors:
            if beliefs is not None:
                try:  # advisory: never let a slow source stall the sink
                    transport.send_nowait(beliefs, Message("beliefs", msg.seq, msg.epoch, {}, {"idx": msg.tensors["idx"], "logits": logits}))
                except transport.PeerTimeout:
                    pass
        layers = range(len(self.cfg.layers))
        if self.received["train"] % self.cfg.log_every == 0:
            for i in layers:
                metrics.write({"kind": "train", "epoch": msg.epoch, "batch": msg.seq, "layer": i,
                               "loss": msg.scalars.get(f"loss.{i}"), "g_pos": msg.scalars.get(f"g_pos.{i}"), "g_neg": msg.scalars.get(f"g_neg.{i}")})
            rate = self.samples_after_first / max(now - self.t_first, 1e-9)
            progress.status([msg.scalars.get(f"loss.{i}", float("nan")) for i in layers], rate, msg.epoch + 1)
        progress.advance()

    @torch.no_grad()
    def on_eval(self, msg: Message, metrics: MetricsWriter, progress: RunProgress) -> None:
        s, t = msg.scalars, msg.tensors
        y, classes = self._labels(msg)
        if t["goodness"].shape != (len(y), classes) or not all(isinstance(s.get(k), int) for k in ("round", "batches")):
            raise ValueError("eval message needs goodness (B, C) and integer round and batches")
        self.received["eval"] += 1
        r = self.rounds.setdefault(int(s["round"]), {"n": 0, "correct": 0, "readout_correct": 0, "parts": 0})
        r["n"] += len(y)
        r["correct"] += int((t["goodness"].argmax(1) == y).sum())
        if "feats" in t and self.readout is not None and t["feats"].shape == (len(y), self.readout.in_features):
            r["readout_correct"] += int((self.readout(t["feats"].float()).argmax(1) == y).sum())
        r["parts"] += 1
        if r["parts"] < int(s["batches"]):
            return
        del self.rounds[int(s["round"])]
        goodness_acc, readout_acc = r["correct"] / r["n"], r["readout_correct"] / r["n"]
        accuracy = readout_acc if self.cfg.predict == "readout" else goodness_acc
        elapsed = time.perf_counter() - self.t0
        record = {"epoch": int(s["round"]), "accuracy": accuracy, "split": s["split"], "wall_s": round(elapsed, 2), "samples": r["n"]}
        if self.cfg.uses_readout and self.cfg.predict != "readout":
            record["readout_accuracy"] = readout_acc
        self.history.append(record)
        metrics.write({"kind": "eval", **record})
        if s["split"] == "test":
            for target in TARGETS:
                if accuracy >= target and str(target) not in self.time_to:
                    self.time_to[str(target)] = round(elapsed, 2)
        progress.log(f"epoch {record['epoch']:>4}/{self.cfg.epochs}  {s['split']} accuracy {accuracy:.4f}"
                     + (f" (readout {readout_acc:.4f})" if "readout_accuracy" in record else "")
                     + f"  wall {elapsed:,.0f}s")

    def _reject(self, reason: str) -> None:
        if reason not in self.rejected and len(self.rejected) >= 20:
            reason = "other reasons"
        if reason not in self.rejected:
            print(f"ffpipe sink: rejected a message: {reason}", flush=True)
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    # ---- the loop

    def run(self) -> dict:
        cfg = self.cfg
        links = transport.Links(self.topo.keys)
        inbox = links.pull(self.topo.sink.bind_url(self.topo.bind_host))
        beliefs = links.push(self.topo.source.connect_url(), hwm=64, linger_ms=0) if cfg.negatives == "hard" else None
        self.t0 = time.perf_counter()
        stop: Message | None = None
        idle = transport.IdleClock("sink", self.timeout_ms)
        total = None
        progress = RunProgress(1, enabled=self.show_progress)
        try:
            with MetricsWriter(self.out / "metrics.jsonl", append=self.resume) as metrics, progress:
                while stop is None and not self.stopping:
                    try:
                        msg = transport.recv(inbox, POLL_MS)
                    except WireError as e:
                        self._reject(str(e)[:120])
                        continue
                    if msg is None:
                        idle.tick(POLL_MS)
                        continue
                    idle.reset()
                    try:
                        if msg.kind == "train":
                            if total is None and isinstance(msg.scalars.get("total"), int):
                                total = msg.scalars["total"]
                                progress.set_total(total)
                            self.on_train(msg, metrics, beliefs, progress)
                        elif msg.kind == "eval":
                            self.on_eval(msg, metrics, progress)
                        elif msg.kind == "stop":
                            stop = msg
                    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
                        self._reject(f"{msg.kind}: {type(e).__name__}: {e}"[:120])
        finally:
            inbox.close()
            if beliefs is not None:
                beliefs.close()
            links.close()
        summary = self.summary(stop)
        if self.readout is not None:
            checkpoint.save(self.out / "readout.pt", {"config": cfg.to_json(), "readout": self.readout.state_dict(),
                                                      "optimizer": self.readout_opt.state_dict()})
        write_json(self.out / "summary.json", summary)
        return summary

    def summary(self, stop: Message | None) -> dict:
        cfg = self.cfg
        s = stop.scalars if stop is not None else {}
        layers = range(len(cfg.layers))
        final = next((h for h in reversed(self.history) if h["split"] == "test"), None)
        last = self.history[-1] if self.history else None
        train_s = (self.t_last - self.t_first) if self.t_first is not None else 0.0
        accounting = {
            "sent_train": s.get("source.sent_train"), "sent_eval": s.get("source.sent_eval"),
            "received_train": self.received["train"], "received_eval": self.received["eval"],
            "applied": [s.get(f"layer{i}.applied") for i in layers],
            "rejected": {**{f"layer{i}": s.get(f"layer{i}.rejected") for i in layers}, "sink": sum(self.rejected.values())},
            "rejected_reasons": {**{f"layer{i}": s.get(f"layer{i}.rejected_reasons") for i in layers if s.get(f"layer{i}.rejected_reasons")},
                                 **({"sink": "; ".join(f"{k} x{v}" for k, v in self.rejected.items())} if self.rejected else {})},
            "complete": stop is not None and s.get("source.sent_train") == self.received["train"]
                        and s.get("source.sent_eval") == self.received["eval"]
                        and all((s.get(f"layer{i}.applied_now") or 0) + (s.get(f"layer{i}.replayed") or 0) == self.received["train"]
                                for i in layers),
        }
        peak = {"source": s.get("source.peak_rss_mb"), **{f"layer{i}": s.get(f"layer{i}.peak_rss_mb") for i in layers},
                "sink": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        return {
            "dataset": cfg.dataset, "mode": "pipeline", "preset": cfg.preset, "layers": list(cfg.layers),
            "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "test_accuracy": final["accuracy"] if final else None,
            "val_accuracy": last["accuracy"] if last and last["split"] == "val" else None,
            "predict": cfg.predict,
            "train_samples_per_s": self.samples_after_first / train_s if train_s > 0 else None,
            "steady_samples_per_s": steady_rate(self.arrivals),
            "train_s": train_s, "wall_s": time.perf_counter() - self.t0,
            "time_to_accuracy_s": self.time_to,
            "interrupted": stop is None or bool(s.get("source.interrupted")),
            "accounting": accounting,
            "peak_rss_mb": peak,
            "busy_s": {f"layer{i}": s.get(f"layer{i}.busy_s") for i in layers},
            "train_busy": {f"layer{i}": s.get(f"layer{i}.train_busy") for i in layers},  # busy share of its train window
            "rss_start_mb": {f"layer{i}": s.get(f"layer{i}.rss_start_mb") for i in layers},  # RSS at its first train batch
            "train_peak_rss_mb": {f"layer{i}": s.get(f"layer{i}.train_peak_rss_mb") for i in layers},  # from then to 1st eval
            "cpu_s": {"source": s.get("source.cpu_s"), **{f"layer{i}": s.get(f"layer{i}.cpu_s") for i in layers},
                      "sink": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 3)},
            "devices": {f"layer{i}": s.get(f"layer{i}.device") for i in layers},
            "threads": cfg.threads or 1,
            "history": self.history,
            "config": cfg.to_dict(),
        }


def steady_rate(arrivals: list[tuple[float, int]], warmup: float = 0.1) -> float | None:
    """Training images per second once the pipeline is full: the first `warmup` fraction of train batches
    (at least one) and the one that starts the clock are left out; each image after them counts once."""
    skip = max(1, int(len(arrivals) * warmup))
    if len(arrivals) <= skip + 1:
        return None
    t0, t1 = arrivals[skip][0], arrivals[-1][0]  # the clock starts when the last warm-up batch is in
    return sum(n for _, n in arrivals[skip + 1 :]) / (t1 - t0) if t1 > t0 else None


def run_sink(cfg: RunConfig, topo: Topology, out: Path, show_progress: bool = True, resume: bool = False) -> dict:
    sink = Sink(cfg, topo, out, show_progress=show_progress, resume=resume)

    def request_stop(signum, frame):
        sink.stopping = True

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C becomes an in-band stop from the source
    signal.signal(signal.SIGTERM, request_stop)
    return sink.run()
