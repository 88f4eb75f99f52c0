"""The sink role: the end of the pipeline. Accuracy, metrics, the readout, progress and the run summary.

Sockets: PULL, binds the sink address (the last layer's outputs, with every layer's metrics in-band).
         PUSH, connects to the source (acknowledgements; readout beliefs for hard negatives).

Every message the source sent is accounted for here: train batches (with each layer's loss and goodness in
their scalars), evaluation batches (per-label goodness summed by the layers on the way), and the stop
message, which carries each role's counts and peak memory.

The sink takes the stream in order, each stream number once: a number it has already taken is a duplicate
(the source resending), one past a gap is dropped and the gap reported to the source, which resends. It
confirms what it has taken (`next`) a few times a second, and what is durable: when every layer's
checkpoint has moved on (the layers report it in-band, in resent batches too), when it has taken another
checkpoint interval of batches the layers hold (a restarted sink catching up), and after each evaluation
round, it saves its own state (sink.pt: readout, counts, history, the length of metrics.jsonl) and confirms
`durable_next` and `durable_batch`, below which the source can forget. A restarted sink continues from sink.pt.
"""

from __future__ import annotations

import resource
import signal
import time
from pathlib import Path

import torch
import zmq
from torch import nn

from ffpipe import checkpoint, ff, transport
from ffpipe.config import RunConfig
from ffpipe.layer import Diverged, NonFiniteLoss, make_optimizer, out_widths, set_lr, warm_up_optimizers
from ffpipe.metrics import TARGETS, MetricsWriter, write_json
from ffpipe.model import readout_step
from ffpipe.progress import RunProgress
from ffpipe.topology import Topology
from ffpipe.wire import Message, Rejections, WireError, parse_shape

POLL_MS = 250
ACK_EVERY_S = 0.2  # how often the sink confirms progress to the source
GAP_REPORT_S = 1.0  # at most one gap report per this long for the same missing message
STATE = "sink.pt"
# settings that decide the stream's numbering: sink.pt from a run with other values cannot be continued
STREAM_FIELDS = ("dataset", "val_size", "train_size", "layers", "batch_size", "epochs", "eval_every", "seed")
READOUT_MADE_WITH = ("readout_optim.name",)  # the readout's optimizer state is that optimizer's
MAX_FEATURE = 1e4  # readout features are normalized outputs (unit mean square): none exceeds sqrt(width) <= 2048


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
        self.rejected = Rejections("sink")
        self.rounds: dict[int, dict] = {}
        self.history: list[dict] = []
        self.time_to: dict[str, float] = {}
        self.t_first: float | None = None  # arrival of the first train batch
        self.t_last = 0.0
        self.samples_after_first = 0
        self.arrivals: list[tuple[float, int]] = []  # (time, images) per train batch, for the steady-state rate
        self.stopping = False
        self.stopped_alone = False
        self.show_progress = show_progress
        self.resume = resume
        self.expected = 0  # the stream number the sink takes next
        self.last_batch = 0  # the last train batch number taken
        self.durable_next, self.durable_batch = 0, 0  # what sink.pt and every layer checkpoint hold
        self.layers_durable = 0
        self.saved_through = 0  # the last train batch that sink.pt and every layer checkpoint hold (the source forgets it)
        self.duplicates = self.out_of_order = 0
        self.metrics_bytes = 0  # length of metrics.jsonl when sink.pt was saved
        self.wall_before = 0.0  # wall time of the run before this process (restart, resume)
        self.ack_at = float("-inf")
        self.gap_reported: tuple[int, float] = (-1, float("-inf"))
        self.heard: dict[str, tuple[float, dict]] = {}  # role -> (when its last heartbeat came, what it said)
        self.roles = {"source", *(f"layer {i}" for i in range(len(cfg.layers)))}
        self.silent: set[str] = set()
        self.silences: dict[str, list[float]] = {}  # role -> how long each silence lasted
        self.readout_widths: dict = {}  # input shape scalar -> width of the readout's features
        self.stop: Message | None = None  # the stop, once taken (kept in sink.pt: a restart then only writes the summary)
        if resume:
            self._load()

    def _load(self) -> None:
        """Continue a stopped or crashed run from sink.pt: the stream position, counts, readout, history."""
        path = self.out / STATE
        if not path.is_file():
            return
        p = checkpoint.load(path)
        changed = self.cfg.changed_from(RunConfig.from_json(p["config"]) if "config" in p else None, STREAM_FIELDS + READOUT_MADE_WITH)
        if changed:  # the stream numbers would not line up with this run's
            raise checkpoint.CheckpointError(f"{path}: from a run with other {', '.join(changed)} "
                                             f"({', '.join(f'{k}={v!r}' for k, v in changed.items())}); resume with the same settings")
        try:
            if p["readout"] is not None:
                w = p["readout"]["weight"]
                self.readout = nn.Linear(w.shape[1], w.shape[0], bias=False)
                self.readout.load_state_dict(p["readout"])
                self.readout_opt = make_optimizer(self.readout.parameters(), self.cfg.readout_optim)
                self.readout_opt.load_state_dict(p["optimizer"])
            self.expected, self.last_batch = p["expected"], p["last_batch"]
            self.durable_next, self.durable_batch, self.layers_durable = p["expected"], p["durable_batch"], p["durable_batch"]
            self.saved_through = min(p["last_batch"], p["durable_batch"])
            self.received, self.samples, self.epoch = dict(p["received"]), p["samples"], p["epoch"]
            self.history, self.time_to, self.rounds = list(p["history"]), dict(p["time_to"]), dict(p["rounds"])
            self.metrics_bytes, self.wall_before = p["metrics_bytes"], p["wall_s"]
            if p.get("stop") and not p["stop"].get("source.interrupted"):  # the run's final stop, not Ctrl-C's
                self.stop = Message("stop", p["stop_seq"], 0, p["stop"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise checkpoint.CheckpointError(f"{path}: does not match this run ({type(e).__name__}: {e})") from e

    def _save(self, metrics: MetricsWriter) -> None:
        """sink.pt, atomically; from now on the source may forget what it holds."""
        self.metrics_bytes = metrics.flush()
        checkpoint.save(self.out / STATE, {
            "config": self.cfg.to_json(), "expected": self.expected, "last_batch": self.last_batch,
            "durable_batch": self.layers_durable, "received": self.received, "samples": self.samples, "epoch": self.epoch,
            "history": self.history, "time_to": self.time_to, "rounds": self.rounds, "metrics_bytes": self.metrics_bytes,
            "wall_s": self.elapsed(),
            "stop": self.stop.scalars if self.stop is not None else None, "stop_seq": self.stop.seq if self.stop is not None else 0,
            "readout": self.readout.state_dict() if self.readout is not None else None,
            "optimizer": self.readout_opt.state_dict() if self.readout_opt is not None else None,
        })
        self.durable_next, self.durable_batch = self.expected, self.layers_durable
        self.saved_through = min(self.last_batch, self.layers_durable)

    def _layers_report(self, msg: Message) -> bool:
        """Take the batch every layer's checkpoint holds from a train message's scalars; True if it moved. Any train
        message tells it, one the sink holds already too: a resent batch carries the layers' newest."""
        durable = [msg.scalars.get(f"durable.{i}") for i in range(len(self.cfg.layers))]
        if all(isinstance(d, int) and not isinstance(d, bool) for d in durable) and min(durable) > self.layers_durable:
            self.layers_durable = min(durable)
            return True
        return False

    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def _ack(self, control: zmq.Socket, force: bool = False, **flags) -> None:
        """Tell the source what the sink has taken and what is durable (advisory: dropped if its queue is full)."""
        now = time.monotonic()
        if not force and now - self.ack_at < ACK_EVERY_S:
            return
        self.ack_at = now
        scalars = {"next": self.expected, "durable_next": self.durable_next, "durable_batch": self.durable_batch,
                   "idle": self._idle(), **flags}
        try:
            transport.send_nowait(control, Message("ack", 0, 0, scalars))
        except transport.PeerTimeout:
            pass

    def _idle(self) -> bool:
        """Every role of the run beats (heard within SILENT_S) and every layer's last beat said it waits for input:
        what the sink lacks now was lost (a restart), not slow in coming (a first batch on a GPU can take seconds)
        nor held by a stalled role (a stopped process beats no more)."""
        now = time.monotonic()
        return all(role in self.heard and now - self.heard[role][0] < transport.SILENT_S
                   and (role == "source" or self.heard[role][1].get("state") == "waiting") for role in self.roles)

    def _gap(self, control: zmq.Socket) -> None:
        """A message is missing: ask the source to resend (once per GAP_REPORT_S for the same one)."""
        now = time.monotonic()
        if self.gap_reported[0] == self.expected and now - self.gap_reported[1] < GAP_REPORT_S:
            return
        self.gap_reported = (self.expected, now)
        self._ack(control, force=True, gap=True)

    # ---- readout (trained here, on the features the layers appended)

    def _readout_width(self, msg: Message) -> int:
        """Features the layers append for the readout: the flat widths of the layers it reads."""
        shape = msg.scalars.get("shape")
        if shape not in self.readout_widths:  # one plan per input shape, not one per message
            try:
                widths = out_widths(self.cfg.layers, parse_shape(shape))
            except (ValueError, WireError) as e:
                raise ValueError(str(e)) from None
            self.readout_widths[shape] = sum(widths[self.cfg.first_readout :])
        return self.readout_widths[shape]

    def _readout_step(self, msg: Message, classes: int) -> torch.Tensor:
        feats, y = msg.tensors["feats"], msg.tensors["y"]
        width = self._readout_width(msg)
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
        try:
            return readout_step(self.readout, self.readout_opt, feats, y)
        except NonFiniteLoss:  # on features as the layers send them (finite, in range), a healthy readout's is finite
            raise Diverged(f"the sink's readout has diverged: its loss on train batch {msg.scalars.get('batch')} is not "
                           "finite (a lower --readout-lr may help)") from None

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
        # every check first: a message refused here must leave the readout, the counts and the metrics untouched
        y, classes = self._labels(msg)
        if "feats" in msg.tensors and beliefs is not None and "idx" not in msg.tensors:
            raise ValueError("a train message with readout features needs the images' idx")
        for i in range(len(self.cfg.layers)):
            loss = msg.scalars.get(f"loss.{i}")
            if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
                raise ValueError(f"loss.{i} must be a number, got {type(loss).__name__}")
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
        g = t["goodness"]
        if g.shape != (len(y), classes) or not g.is_floating_point() or not all(isinstance(s.get(k), int) for k in ("round", "batches")):
            raise ValueError("eval message needs float goodness (B, C) and integer round and batches")
        correct = int((g.argmax(1) == y).sum())
        readout_correct = 0
        if "feats" in t and self.readout is not None and t["feats"].shape == (len(y), self.readout.in_features):
            readout_correct = int((self.readout(t["feats"].float()).argmax(1) == y).sum())
        # counted only now: a message refused above leaves the round as it was
        self.received["eval"] += 1
        r = self.rounds.setdefault(int(s["round"]), {"n": 0, "correct": 0, "readout_correct": 0, "parts": 0})
        r["n"] += len(y)
        r["correct"] += correct
        r["readout_correct"] += readout_correct
        r["parts"] += 1
        ahead = [v for k, v in s.items() if k.startswith("ahead.") and isinstance(v, int) and not isinstance(v, bool)]
        r["ahead"] = max([r.get("ahead", 0), *ahead])  # a resent round that some layer scored with newer weights
        if r["parts"] < int(s["batches"]):
            return
        del self.rounds[int(s["round"])]
        goodness_acc, readout_acc = r["correct"] / r["n"], r["readout_correct"] / r["n"]
        accuracy = readout_acc if self.cfg.predict == "readout" else goodness_acc
        elapsed = self.elapsed()
        record = {"epoch": int(s["round"]), "accuracy": accuracy, "split": s["split"], "wall_s": round(elapsed, 2), "samples": r["n"]}
        if self.cfg.uses_readout and self.cfg.predict != "readout":
            record["readout_accuracy"] = readout_acc
        elif self.cfg.competitive and self.cfg.predict == "readout":  # its class goodness, beside the readout
            record["goodness_accuracy"] = goodness_acc
        if r["ahead"]:
            record["weights_ahead_batches"] = r["ahead"]
        self.history.append(record)
        metrics.write({"kind": "eval", **record})
        if s["split"] == "test":
            for target in TARGETS:
                if accuracy >= target and str(target) not in self.time_to:
                    self.time_to[str(target)] = round(elapsed, 2)
        progress.log(f"epoch {record['epoch']:>4}/{self.cfg.epochs}  {s['split']} accuracy {accuracy:.4f}"
                     + (f" (readout {readout_acc:.4f})" if "readout_accuracy" in record else "")
                     + (f" (goodness {goodness_acc:.4f})" if "goodness_accuracy" in record else "")
                     + f"  wall {elapsed:,.0f}s"
                     + (f"  (resent: scored by layers {r['ahead']} batches further on)" if r["ahead"] else ""))

    # ---- the loop

    def _heartbeat(self, msg: Message) -> None:
        role = msg.scalars.get("role")
        if not isinstance(role, str) or not (role == "source" or role.startswith("layer ")) or len(self.heard) > 64 and role not in self.heard:
            raise ValueError(f"a heartbeat needs a role, source or layer N; got {role!r}")
        now = time.monotonic()
        if role in self.silent:
            quiet = now - self.heard[role][0]
            self.silences.setdefault(role, []).append(round(quiet, 1))
            self.silent.discard(role)
            print(f"ffpipe sink: {role} is back after {quiet:.1f}s", flush=True)
        self.heard[role] = (now, msg.scalars)

    def _check_silence(self, pending=lambda: False) -> None:
        """Report each role (that has beaten once) not heard from for SILENT_S, once per silence. Not while
        `pending()`: messages wait in the sink's inbox, which may hold the heartbeats of a role that only seems
        silent because the sink itself was busy (its first readout step imports torch's compiler, seconds)."""
        now = time.monotonic()
        late = [role for role, (at, _) in self.heard.items() if role not in self.silent and now - at > transport.SILENT_S]
        if not late or pending():
            return
        for role in late:
            at, said = self.heard[role]
            self.silent.add(role)
            print(f"ffpipe sink: nothing from {role} (pid {said.get('pid')}) for {now - at:.1f}s; "
                  f"it was {said.get('state', 'unknown')}", flush=True)

    def _validate(self, msg: Message) -> None:
        """Refuse a malformed train or eval message before it can touch the stream position."""
        y, classes = self._labels(msg)
        s, t = msg.scalars, msg.tensors
        if msg.kind == "train":
            if not isinstance(s.get("batch"), int) or isinstance(s.get("batch"), bool) or s["batch"] < 1:
                raise ValueError(f"train message needs a positive integer batch, got {s.get('batch')!r}")
            width = self._readout_width(msg)
            if "feats" in t and (t["feats"].dtype != torch.float32 or t["feats"].shape != (len(y), width)):
                raise ValueError(f"feats must be float32 ({len(y)}, {width}), got {t['feats'].dtype} {tuple(t['feats'].shape)}")
            if "feats" in t and t["feats"].numel() and t["feats"].abs().amax() > MAX_FEATURE:  # a step on them would wreck the readout
                raise ValueError(f"feats hold values beyond {MAX_FEATURE:g}, which no layer's normalized outputs reach")
        elif msg.kind == "eval":
            if t["goodness"].shape != (len(y), classes) or not all(isinstance(s.get(k), int) for k in ("round", "batches")):
                raise ValueError("eval message needs goodness (B, C) and integer round and batches")
        else:
            raise ValueError(f"the sink does not take {msg.kind!r} messages")

    def _take(self, msg: Message, metrics: MetricsWriter, control: zmq.Socket, progress: RunProgress) -> None:
        """The next message of the stream: train or evaluate, then save and confirm what became durable."""
        if msg.kind == "train":
            self.on_train(msg, metrics, control if self.cfg.hard_negatives else None, progress)
            self.last_batch = msg.scalars["batch"]
            self.expected += 1
            # saved when the layers hold more; and when the sink reaches what they hold, or has taken another
            # checkpoint interval of it: after a restart the layers can be far ahead, hold no more until new batches
            # come, and the source sends none until it may forget some (its window is full)
            moved = self._layers_report(msg)
            held = min(self.last_batch, self.layers_durable)
            if moved or (held > self.saved_through and (held == self.layers_durable
                                                        or held >= self.saved_through + self.cfg.checkpoint_every)):
                self._save(metrics)
                self._ack(control, force=True)
        else:
            rounds = len(self.history)
            self.on_eval(msg, metrics, progress)
            self.expected += 1
            if len(self.history) > rounds:  # a round completed: keep it
                self._save(metrics)
                self._ack(control, force=True)

    def _duplicate(self, msg: Message, metrics: MetricsWriter, control: zmq.Socket) -> None:
        """A message the sink holds already (the source resending): not taken again, but what it says of the layers'
        checkpoints counts (while the source waits to forget, resent batches are the only news of them)."""
        self.duplicates += 1
        if msg.kind == "train" and self._layers_report(msg):
            self._save(metrics)
            self._ack(control, force=True)

    def run(self) -> dict:
        cfg = self.cfg
        links = transport.Links(self.topo.keys)
        inbox = links.pull(self.topo.sink.bind_url(self.topo.bind_host))
        control = links.push(self.topo.source.connect_url(), hwm=64, linger_ms=2000)
        self.t0 = time.perf_counter()
        stop: Message | None = self.stop  # a sink restarted after it took the stop only writes the summary
        traffic_at = time.monotonic()  # the last message other than a heartbeat
        total = None
        progress = RunProgress(1, enabled=self.show_progress)
        metrics_path = self.out / "metrics.jsonl"
        if self.resume and metrics_path.is_file():  # drop records written after sink.pt: they come again
            with open(metrics_path, "r+b") as f:
                f.truncate(min(self.metrics_bytes, f.seek(0, 2)))
        try:
            with MetricsWriter(metrics_path, append=self.resume) as metrics, progress:
                while stop is None and not self.stopping:
                    try:
                        msg = transport.recv(inbox, POLL_MS)
                    except WireError as e:  # refused, and no sign of life: the checks below still run
                        self.rejected.add(str(e)[:120])
                        msg = None
                    self._check_silence(lambda: inbox.poll(0, zmq.POLLIN))
                    self._ack(control)
                    if time.monotonic() - traffic_at > self.timeout_ms / 1000:
                        raise transport.PeerTimeout(f"sink: nothing received for {self.timeout_ms / 1000:g}s")
                    if msg is None:
                        continue
                    try:
                        if msg.kind == "heartbeat":  # a sign of life, not traffic
                            self._heartbeat(msg)
                            continue
                        traffic_at = time.monotonic()
                        if msg.kind == "gap":  # a layer dropped batches after a gap: resend from where the sink is
                            self._gap(control)
                        elif msg.kind == "stop":
                            sent = msg.scalars.get("source.sent_train")
                            if not (isinstance(sent, int) and not isinstance(sent, bool) and sent >= self.last_batch):
                                raise ValueError(f"a stop must name the source's train batches sent, at least the "
                                                 f"{self.last_batch} taken here; got {sent!r}")
                            if msg.seq == self.expected or msg.scalars.get("source.interrupted") is True:
                                stop = msg
                            else:
                                self._gap(control)
                        else:
                            self._validate(msg)
                            if msg.seq < self.expected:
                                self._duplicate(msg, metrics, control)
                            elif msg.seq > self.expected:
                                self.out_of_order += 1
                                self._gap(control)
                            else:
                                if total is None and msg.kind == "train" and isinstance(msg.scalars.get("total"), int):
                                    total = msg.scalars["total"]
                                    progress.set_total(total)
                                    progress.advance(self.received["train"])
                                self._take(msg, metrics, control, progress)
                    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
                        self.rejected.add(f"{msg.kind}: {type(e).__name__}: {e}"[:120])
                    self._ack(control)
                if stop is not None:
                    transport.reject_the_rest(inbox, self.rejected, expected=("stop", "heartbeat"))
                    self.stop = stop
                    self._save(metrics)
                    self._ack(control, force=True, stopped=True)
                else:  # a SIGTERM to the sink alone: keep what it has taken, as a layer keeps its checkpoint
                    self._save(metrics)
        finally:
            inbox.close()
            control.close()
            links.close()
        self.stopped_alone = stop is None  # the loop ended on a SIGTERM to the sink alone, not at the stream's stop
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
        applied = [s.get(f"layer{i}.applied") for i in layers]
        sent = s.get("source.sent_train")
        stream_complete = stop is not None and stop.seq == self.expected
        accounting = {
            "sent_train": sent, "sent_eval": s.get("source.sent_eval"),  # the whole run's, over resumes and restarts
            "sent_train_now": s.get("source.sent_train_now"),  # by this source process
            "received_train": self.received["train"], "received_eval": self.received["eval"],
            "applied": applied,  # per layer: batches in its weights (its checkpoints' lineage), each applied once
            "lost": {f"layer{i}": sent - a for i, a in enumerate(applied)} if isinstance(sent, int) and None not in applied else None,
            "applied_twice": {f"layer{i}": s.get(f"layer{i}.applied") - s.get(f"layer{i}.last_batch") for i in layers
                              if isinstance(s.get(f"layer{i}.last_batch"), int)},
            "resent": s.get("source.resent"), "retransmissions": s.get("source.retransmissions"),
            "replayed": {f"layer{i}": s.get(f"layer{i}.replayed") for i in layers},  # resent batches forwarded, not applied
            "out_of_order": {**{f"layer{i}": s.get(f"layer{i}.out_of_order") for i in layers}, "sink": self.out_of_order},
            "duplicates": self.duplicates,
            "rejected": {"source": s.get("source.rejected"), **{f"layer{i}": s.get(f"layer{i}.rejected") for i in layers},
                         "sink": self.rejected.total()},
            "rejected_reasons": {**({"source": s["source.rejected_reasons"]} if s.get("source.rejected_reasons") else {}),
                                 **{f"layer{i}": s.get(f"layer{i}.rejected_reasons") for i in layers if s.get(f"layer{i}.rejected_reasons")},
                                 **({"sink": self.rejected.reasons()} if self.rejected else {})},
            "complete": stream_complete and sent == self.received["train"] == self.last_batch
                        and s.get("source.sent_eval") == self.received["eval"]
                        and all(a == sent for a in applied)
                        and all(s.get(f"layer{i}.last_batch") == sent for i in layers),
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
            # each layer's local update per train batch, wall and its thread's CPU, in ms (CPU devices; first update left out)
            "update_ms": {f"layer{i}": s.get(f"layer{i}.update_ms") for i in layers},
            "update_cpu_ms": {f"layer{i}": s.get(f"layer{i}.update_cpu_ms") for i in layers},
            "rss_start_mb": {f"layer{i}": s.get(f"layer{i}.rss_start_mb") for i in layers},  # RSS at its first train batch
            "train_peak_rss_mb": {f"layer{i}": s.get(f"layer{i}.train_peak_rss_mb") for i in layers},  # from then to 1st eval
            "peak_gpu_mb": {f"layer{i}": s.get(f"layer{i}.peak_gpu_mb") for i in layers},  # allocated; None on CPU
            "cpu_s": {"source": s.get("source.cpu_s"), **{f"layer{i}": s.get(f"layer{i}.cpu_s") for i in layers},
                      "sink": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 3)},
            "devices": {f"layer{i}": s.get(f"layer{i}.device") for i in layers},
            "heartbeats": {"every_s": transport.HEARTBEAT_S, "silent_after_s": transport.SILENT_S,
                           "roles_heard": sorted(self.heard), "silences_s": self.silences},
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


def run_sink(cfg: RunConfig, topo: Topology, out: Path, show_progress: bool = True, resume: bool = False) -> bool:
    """Collect until the stream's stop (returns False) or a SIGTERM to the sink alone (True: the run is not over)."""
    if cfg.uses_readout:
        warm_up_optimizers()
    sink = Sink(cfg, topo, out, show_progress=show_progress, resume=resume)

    def request_stop(signum, frame):
        sink.stopping = True
        transport.exit_soon_if_orphaned()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C becomes an in-band stop from the source
    signal.signal(signal.SIGTERM, request_stop)
    sink.run()
    return sink.stopped_alone
