"""The source role: dataset -> numbered batches of positives and negatives, evaluation batches, then stop.

Sockets: PUSH, connects to layer 0 (batches flow downstream).
         PULL, binds the source address (the sink's acknowledgements, and its beliefs for hard negatives).

Batches are drawn exactly as the in-process trainer draws them (same permutation and random negatives
from the same generator), so a pipelined run with random negatives applies the very same updates. Hard
negatives come from the sink's readout belief about each training image, sent back as it is computed; a
batch uses the newest belief the source has received (from the image's previous epoch, since the pipeline
runs ahead of the sink).

Nothing is lost: every message of the run has a stream number (`seq`, contiguous over train and eval
messages). The source keeps the recipe of each message it sent (indices, wrong labels, augmented images)
until the sink confirms that it, and every layer's checkpoint, hold it ("durable"). When the sink reports a
gap, or confirms nothing for `retransmit_s`, the source sends everything it still keeps again, in order
(go-back-N): a layer applies a batch only if it is the next one it needs and forwards the ones it has learned
from already, and the sink takes each stream number once. A restarted source starts again after the
batches that every layer and the sink hold in their checkpoints.
"""

from __future__ import annotations

import collections
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from ffpipe import checkpoint, ff, transport
from ffpipe.config import RunConfig
from ffpipe.data import Data, augment, batch_indices, input_stats, mirror_draw
from ffpipe.model import fit_whitening, prepare_inputs
from ffpipe.topology import Topology
from ffpipe.wire import Message, Rejections, WireError

EVAL_BATCH = 250  # images per evaluation message (each carries every label: EVAL_BATCH x C rows)
POLL_MS = 100  # how often a blocked or waiting source looks at the sink's acknowledgements
STOP_DRAIN_S = 3.0  # after a stop request, how long the source waits for what is in flight to be confirmed
PREPARED_MAX_BYTES = 2 << 30  # the most memory a whitened run's source spends on inputs computed once (its k8s limit: 4 Gi)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Sent:
    """What the source needs to send a message again: a few indices and labels, not the tensors."""

    seq: int
    kind: str  # "train" or "eval"
    epoch: int  # train: the epoch (0-based); eval: the round (epochs completed)
    batch: int = 0  # train: the batch number, 1, 2, ... over the whole run
    idx: torch.Tensor | None = None  # train: which training images
    neg: torch.Tensor | None = None  # train: their wrong labels
    images: torch.Tensor | None = None  # train, with augmentation: the augmented uint8 images
    mirror: torch.Tensor | None = None  # train, with inputs prepared once and --flip: which images are mirrored
    part: int = 0  # eval: which slice of the evaluation split


class Source:
    def __init__(self, cfg: RunConfig, data: Data, topo: Topology, peer_timeout_s: float = 120.0, skip: int = 0,
                 sink_next: int = 0, quiet: bool = False):
        if cfg.schedule != "joint":
            raise ValueError("the pipeline trains every layer on every batch: use --schedule joint (greedy is in-process only)")
        self.cfg, self.data, self.topo = cfg, data, topo
        self.timeout_s = peer_timeout_s
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.mean, self.std = input_stats(data, cfg.standardize, cfg.equalize)
        self.whiten = whitening(cfg, data, self.mean, self.std, Path(cfg.out), log=not quiet) if cfg.whiten else None
        self.prepared = self._prepare_once(quiet) if cfg.whiten and not cfg.shift else None
        self.beliefs = torch.zeros(len(data.train), data.num_classes)  # readout logits per training image
        self.rejected = Rejections("source")  # malformed messages from the sink's side
        self.stopping = False
        self.skip = skip  # train batches every layer and the sink hold already (restart, resume): drawn, not sent
        self.sink_next = sink_next  # the sink holds every message below this: evaluations below it are not sent
        self.seq = 0  # the stream number of the next message of the run
        self.per_epoch = (len(data.train) + cfg.batch_size - 1) // cfg.batch_size
        self.total = cfg.epochs * self.per_epoch
        # kept until durable; the window bounds them: two checkpoint intervals plus what a pipeline holds in flight
        self.pending: collections.deque[Sent] = collections.deque()
        self.window = 2 * cfg.checkpoint_every + 64  # train messages; evaluations do not count (a round may be long)
        self.pending_train = 0
        self.confirmed = 0  # the sink holds every message below this stream number
        self.progress_at = time.monotonic()  # when `confirmed` last moved (or the source last resent)
        self.resent_at = float("-inf")
        self.resent_from = -1
        self.stop_confirmed = False
        self.idle_since: float | None = None  # since when the sink has said every layer waits for input
        self.resend_due = False
        self.backoff = 1  # doubles after each resend on a timeout that brought no progress (a stall, not a loss)
        self.last_batch = skip  # the highest train batch number in the stream so far
        self.sent = {"train": 0, "eval": 0, "resent": 0, "retransmissions": 0}
        self.state = "sending"  # for the heartbeat: sending, or waiting (for the sink to confirm)
        self.heard_at = time.monotonic()  # the sink's last acknowledgement (its heartbeat, for the source)
        self.sink_silent = False

    # ---- what the stream holds

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_inputs(images, self.mean, self.std, self.cfg.standardize, self.cfg.equalize, self.whiten)

    def _prepare_once(self, quiet: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A whitened run's training inputs computed once, and with --flip their mirror images' too: whitening a
        batch, a (B, D) @ (D, D) product, was most of the source's CPU time (about 25 ms of 55 for a CIFAR-10
        batch of 100), taken from the cores the layers train on. Not with --shift, whose translations have too
        many outcomes; None when the copies would take more than PREPARED_MAX_BYTES (then each batch is
        whitened as it is sent)."""
        train, flip = self.data.train.x, self.cfg.flip
        n, d = len(train), self.data.num_features
        size = (1 + flip) * n * d * 4
        if size > PREPARED_MAX_BYTES:
            if not quiet:
                print(f"ffpipe source: whitening each batch as it is sent ({size / 2**30:.1f} GiB of inputs computed "
                      f"once would pass {PREPARED_MAX_BYTES / 2**30:.0f} GiB)", flush=True)
            return None
        t0 = time.perf_counter()
        plain = torch.empty(n, d)
        mirrored = torch.empty(n, d) if flip else None
        for i in range(0, n, 1000):
            plain[i : i + 1000] = self._inputs(train[i : i + 1000])
            if flip:
                mirrored[i : i + 1000] = self._inputs(train[i : i + 1000].flip(3))
        if not quiet:
            print(f"ffpipe source: whitened the {n:,} training images{' and their mirror images' if flip else ''} once "
                  f"({size / 2**20:,.0f} MB) in {time.perf_counter() - t0:.1f}s", flush=True)
        return plain, mirrored

    def _augmented(self, idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(images, mirror): the batch's images after augmentation, or None when augmentation is off (the dataset's
        own) or the inputs were prepared once; then, with --flip, which images are mirrored (`augment`'s draw)."""
        if self.prepared is not None:
            return None, mirror_draw(len(idx), self.gen) if self.cfg.flip else None
        if not self.cfg.shift and not self.cfg.flip:
            return None, None
        return augment(self.data.train.x[idx], self.cfg.shift, self.cfg.flip, self.gen), None

    def _negatives(self, idx: torch.Tensor) -> torch.Tensor:
        labels = self.data.train.y[idx]
        if self.cfg.hard_negatives:
            return ff.hard_wrong_labels(self.beliefs[idx], labels, self.gen)
        return ff.random_wrong_labels(labels, self.data.num_classes, self.gen)

    def stream(self):
        """Every message of the run in order, as recipes, drawn lazily (hard negatives use the newest beliefs).
        Batches up to `skip` and the evaluations before them are drawn the same way and numbered, but not yielded."""
        cfg, batch = self.cfg, 0
        for epoch in range(cfg.epochs):
            for idx in batch_indices(len(self.data.train), cfg.batch_size, self.gen):
                batch += 1
                (images, mirror), neg = self._augmented(idx), self._negatives(idx)  # in this order, as the in-process trainer
                if batch > self.skip:
                    yield Sent(self.seq, "train", epoch, batch, idx, neg, images, mirror)
                self.seq += 1
            if epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                for part in range(self.eval_batches()):
                    if (epoch + 1) * self.per_epoch >= self.skip and self.seq >= self.sink_next:  # else it was taken
                        yield Sent(self.seq, "eval", epoch + 1, part=part)
                    self.seq += 1

    def train_message(self, s: Sent) -> Message:
        cfg, c = self.cfg, self.data.num_classes
        labels = self.data.train.y[s.idx]
        if self.prepared is not None:
            plain, mirrored = self.prepared
            x = plain[s.idx] if s.mirror is None else torch.where(s.mirror[:, None], mirrored[s.idx], plain[s.idx])
        else:
            x = self._inputs(self.data.train.x[s.idx] if s.images is None else s.images)
        tensors = {"x": x, "y": labels, "idx": s.idx}  # each image once: layer 0 writes the labels in
        if not cfg.competitive:  # the competitive loss learns from the labels alone, with no negatives
            tensors["neg"] = s.neg
        if cfg.uses_readout:
            tensors["feats"] = torch.empty(len(s.idx), 0)
        return Message("train", s.seq, s.epoch, {"total": self.total, "classes": c, "batch": s.batch, "shape": self.shape}, tensors)

    @property
    def shape(self) -> str:
        """The input images' (C, H, W) as "CxHxW": image layers size themselves from it."""
        return "x".join(map(str, self.data.shape))

    @property
    def eval_split(self):
        return (self.data.val, "val") if self.data.val is not None else (self.data.test, "test")

    def eval_batches(self) -> int:
        return (len(self.eval_split[0]) + EVAL_BATCH - 1) // EVAL_BATCH

    def eval_message(self, s: Sent) -> Message:
        """One slice of an evaluation round (EVAL_BATCH images, each with every label)."""
        cfg, c = self.cfg, self.data.num_classes
        split, name = self.eval_split
        i = s.part * EVAL_BATCH
        images, labels = split.x[i : i + EVAL_BATCH], split.y[i : i + EVAL_BATCH]
        tensors = {"x": self._inputs(images), "goodness": torch.zeros(len(labels), c), "y": labels}  # layer 0 writes every label in
        if cfg.uses_readout:
            tensors["feats"] = torch.empty(len(labels), 0)
        scalars = {"split": name, "round": s.epoch, "batches": self.eval_batches(), "part": s.part, "classes": c, "shape": self.shape,
                   "final": s.epoch == cfg.epochs, "after": s.epoch * self.per_epoch}
        return Message("eval", s.seq, s.epoch, scalars, tensors)

    def message(self, s: Sent) -> Message:
        return self.train_message(s) if s.kind == "train" else self.eval_message(s)

    # ---- the sink's acknowledgements (and beliefs)

    def _on_ack(self, s: dict) -> None:
        fields = ("next", "durable_next", "durable_batch")
        if not all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool) and s[k] >= 0 for k in fields):
            raise WireError(f"an ack needs non-negative integers {', '.join(fields)}")
        now = time.monotonic()
        if self.sink_silent:
            print(f"ffpipe source: the sink is back after {now - self.heard_at:.1f}s", flush=True)
            self.sink_silent = False
        self.heard_at = now
        if s.get("idle") is not True:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        if s["next"] > self.confirmed:
            self.confirmed, self.progress_at, self.backoff = s["next"], now, 1
        while self.pending and self.pending[0].seq < s["durable_next"] and (
                self.pending[0].kind == "eval" or self.pending[0].batch <= s["durable_batch"]):
            self.pending_train -= self.pending.popleft().kind == "train"  # durable: it can never be needed again
            self.progress_at = now
        if s.get("gap") and (self.confirmed > self.resent_from or now - self.resent_at > self.cfg.retransmit_s):
            self.resend_due = True  # a gap the sink has not reported since the last resend
        if s.get("stopped"):
            self.stop_confirmed = True

    def _on_beliefs(self, msg: Message) -> None:
        idx, logits = msg.tensors.get("idx"), msg.tensors.get("logits")
        n, c = self.beliefs.shape
        if (idx is None or logits is None or idx.dtype != torch.int64 or idx.ndim != 1 or logits.shape != (len(idx), c)
                or logits.dtype != torch.float32 or (len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n))):
            raise WireError("a belief message needs idx (B,) int64 in range and logits (B, C) float32")
        if not bool(torch.isfinite(logits).all()):  # hard negatives sample from their softmax
            raise WireError("a belief message's logits must be finite")
        self.beliefs[idx] = logits

    def _drain(self, inbox: zmq.Socket, wait_ms: int = 0) -> None:
        """Take everything the sink has sent (waiting up to wait_ms for the first message); then, with nothing left
        unread that could be the sink's news, report it silent if it is."""
        while inbox.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0
            try:
                msg = transport.recv(inbox, 0)
                if msg.kind == "ack":
                    self._on_ack(msg.scalars)
                elif msg.kind == "beliefs":
                    self._on_beliefs(msg)
                else:
                    raise WireError(f"the source does not take {msg.kind!r} messages")
            except WireError as e:
                self.rejected.add(str(e))
        if not self.sink_silent and time.monotonic() - self.heard_at > transport.SILENT_S:
            self.sink_silent = True
            print(f"ffpipe source: nothing from the sink for {time.monotonic() - self.heard_at:.1f}s", flush=True)

    # ---- sending

    def _send(self, out: zmq.Socket, inbox: zmq.Socket, msg: Message) -> None:
        """Send, blocking while layer 0's queue is full (backpressure) but reading acknowledgements meanwhile."""
        waited = 0.0
        while not out.poll(POLL_MS, zmq.POLLOUT):
            self._drain(inbox)
            if self.stop_confirmed:  # the run is over (a stop resent to a layer 0 that has passed it on and gone)
                return
            waited += POLL_MS / 1000
            if waited >= self.timeout_s:
                raise transport.PeerTimeout(f"source: layer 0 took nothing for {waited:g}s (gone or stuck)")
        transport.send(out, msg, 0)

    def _resend(self, out: zmq.Socket, inbox: zmq.Socket) -> None:
        """Go back: send every message not yet durable again, in order."""
        self.resend_due = False
        self.resent_at = self.progress_at = time.monotonic()
        self.resent_from = self.confirmed
        self.sent["retransmissions"] += 1
        print(f"ffpipe source: resending {len(self.pending)} batches from #{self.pending[0].seq} "
              f"(the sink holds everything before #{self.confirmed})", flush=True)
        for s in list(self.pending):
            self._send(out, inbox, self.message(s))
            self.sent["resent"] += 1

    def _check(self, out: zmq.Socket, inbox: zmq.Socket) -> None:
        """Resend when the sink reported a gap, or when nothing became confirmed or durable for retransmit_s
        (once the sink has confirmed something; before that, roles may still be starting or busy with their first
        batch: once the sink has said for that long that every layer waits for input, with nothing confirmed)."""
        now, wait = time.monotonic(), self.cfg.retransmit_s * self.backoff
        if self.confirmed > 0:
            stalled = now - self.progress_at > wait
        else:  # e.g. a sink lost before its first confirmation, with what it had taken
            stalled = self.idle_since is not None and now - max(self.idle_since, self.progress_at) > wait
        if self.pending and (self.resend_due or stalled):
            if stalled and not self.resend_due:
                self.backoff = min(self.backoff * 2, 8)
            self._resend(out, inbox)
        self.resend_due = False

    def run(self) -> dict:
        links = transport.Links(self.topo.keys)
        out = links.push(self.topo.layers[0].connect_url(), linger_ms=int(self.timeout_s * 1000))
        inbox = links.pull(self.topo.source.bind_url(self.topo.bind_host), hwm=1000)
        beat = transport.Heartbeat(links, self.topo.sink.connect_url(), "source",
                                   lambda: {"state": self.state, "sent": self.last_batch})
        self.heard_at = time.monotonic()
        self.resend_due = False
        stream = self.stream()
        try:
            for s in stream:  # send the run, at most `window` messages ahead of what is durable
                self._drain(inbox)
                self._check(out, inbox)
                moved = self._unmoved_for(None)
                while self.pending_train >= self.window and not self.stopping:  # the sink's acks free the window
                    self._drain(inbox, POLL_MS)
                    moved = self._unmoved_for(moved, "with its window of unconfirmed batches full")
                    self._check(out, inbox)
                if self.stopping:
                    break
                self._send(out, inbox, self.message(s))
                self.pending.append(s)
                self.pending_train += s.kind == "train"
                self.sent[s.kind] += 1
                if s.kind == "train":
                    self.last_batch = s.batch
            end = self.seq if not self.stopping else (self.pending[-1].seq + 1 if self.pending else self.confirmed)
            self.state = "waiting"
            self._wait_durable(out, inbox, end)
            self._stop(out, inbox, end)
        finally:
            beat.stop()
            out.close(linger=0)
            inbox.close()
            links.close()
        return {"sent_train": self.sent["train"], "sent_eval": self.sent["eval"], "interrupted": self.stopping,
                "resent": self.sent["resent"]}

    def _wait_durable(self, out: zmq.Socket, inbox: zmq.Socket, end: int) -> None:
        """Until every message before `end` is durable (resending as needed), so that the stop, which ends every
        role, comes after a run that nothing can take back. After a stop request: until the sink has taken
        everything sent, for at most STOP_DRAIN_S."""
        t0 = time.monotonic()
        moved = self._unmoved_for(None)
        while (self.pending and not self.stopping) or self.confirmed < end:  # stopping: layers checkpoint at the stop
            self._drain(inbox, POLL_MS)
            if self.stopping and time.monotonic() - t0 > STOP_DRAIN_S:
                return
            moved = self._unmoved_for(moved, "at the end of the run")
            self._check(out, inbox)

    def _unmoved_for(self, last: tuple | None, waiting: str = "") -> tuple:
        """A waiting source's clock: (what the sink confirmed, what is pending, since when); PeerTimeout once
        neither moved for the peer timeout. `last` None starts it."""
        now, state = time.monotonic(), (self.confirmed, len(self.pending))
        if last is None or last[:2] != state:
            return (*state, now)
        if now - last[2] > self.timeout_s:
            raise transport.PeerTimeout(f"source: nothing became confirmed or durable for {self.timeout_s:g}s "
                                        f"{waiting} (the sink gone or stuck)")
        return last

    def _stop(self, out: zmq.Socket, inbox: zmq.Socket, end: int) -> None:
        """The stop message: it takes no stream number (a resumed run continues at `end`). Each layer checkpoints
        as it passes; the sink confirms it. Sent again if unconfirmed after retransmit_s, up to the peer timeout."""
        stats = {"source.sent_train": self.last_batch, "source.sent_eval": end - self.last_batch,
                 "source.sent_train_now": self.sent["train"],
                 "source.resent": self.sent["resent"], "source.retransmissions": self.sent["retransmissions"],
                 "source.rejected": self.rejected.total(), "source.rejected_reasons": self.rejected.reasons(),
                 "source.peak_rss_mb": round(peak_rss_mb(), 1), "source.interrupted": self.stopping,
                 "source.cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 3)}
        t0 = time.monotonic()
        while not self.stop_confirmed:
            self._send(out, inbox, Message("stop", end, 0, stats))
            sent_at = time.monotonic()
            while not self.stop_confirmed and time.monotonic() - sent_at < self.cfg.retransmit_s:
                self._drain(inbox, POLL_MS)
            if not self.stop_confirmed and time.monotonic() - t0 > self.timeout_s:
                raise transport.PeerTimeout(f"source: the sink did not confirm the stop within {self.timeout_s:g}s")


WHITENING = "whitening.pt"


def whitening(cfg: RunConfig, data: Data, mean: torch.Tensor, std: torch.Tensor, out: Path, log: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's ZCA whitening (--whiten): fitted on the training images once and saved to `out`/whitening.pt,
    which a restarted or resumed source reads back (the same inputs to the last bit) and from which the launcher
    assembles the model. A file from other data or another epsilon is fitted afresh."""
    path = out / WHITENING
    made = {"dataset": data.name, "train": len(data.train), "eps": cfg.whiten, "standardize": cfg.standardize,
            "equalize": cfg.equalize}
    if path.is_file():
        saved = checkpoint.load(path)
        if saved.get("made") == made:
            return saved["center"], saved["matrix"]
    t0 = time.perf_counter()
    center, matrix = fit_whitening(data.train.x, mean, std, cfg.standardize, cfg.equalize, cfg.whiten)
    checkpoint.save(path, {"made": made, "center": center, "matrix": matrix})
    if log:
        print(f"ffpipe source: ZCA whitening fitted on {len(data.train):,} training images ({center.numel():,} inputs, "
              f"eps {cfg.whiten:g}) in {time.perf_counter() - t0:.1f}s", flush=True)
    return center, matrix


def durable_state(out: Path, num_layers: int) -> tuple[int, int, bool]:
    """What the checkpoints in `out` hold, for a restarted or resumed source: the train batches every layer and
    the sink hold, the stream number the sink takes next, and whether every layer has passed the stop on."""
    batches, stopped = [], True
    for i in range(num_layers):
        path = out / f"layer{i}.pt"
        layer = checkpoint.load(path) if path.is_file() else {}
        batches.append(layer.get("last_batch", 0))
        stopped = stopped and bool(layer.get("stop")) and not layer["stop"].get("source.interrupted")  # the final stop
    sink = checkpoint.load(out / "sink.pt") if (out / "sink.pt").is_file() else {}
    return min(batches + [sink.get("last_batch", 0)]), sink.get("expected", 0), stopped


def run_source(cfg: RunConfig, data: Data, topo: Topology, resume: bool = False, quiet: bool = False) -> dict | None:
    """Send the run; `quiet`: warnings only (no fit, resume or closing lines)."""
    skip, sink_next, stopped = durable_state(Path(cfg.out), len(cfg.layers)) if resume else (0, 0, False)
    if stopped:  # restarted after the stop went out: it is on its way to the sink (layers resend it if restarted)
        print("ffpipe source: every layer has passed the stop on; nothing left to send", flush=True)
        return None
    if skip and not quiet:
        print(f"ffpipe source: resuming after {skip} train batches", flush=True)
    source = Source(cfg, data, topo, skip=skip, sink_next=sink_next, quiet=quiet)

    def request_stop(signum, frame):  # SIGTERM/SIGINT: stop sending batches, send stop, exit cleanly
        source.stopping = True
        transport.exit_soon_if_orphaned()  # the launcher died: the layers it sent the stop to are going too

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    t0 = time.perf_counter()
    result = source.run()
    if quiet:
        return result
    print(f"ffpipe source: sent {result['sent_train']} train and {result['sent_eval']} eval batches"
          + (f" ({result['resent']} resent)" if result["resent"] else "") + f" in {time.perf_counter() - t0:.1f}s"
          + (" (interrupted)" if result["interrupted"] else ""), flush=True)
    return result
