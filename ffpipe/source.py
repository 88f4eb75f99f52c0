"""The source role: dataset -> numbered batches of positives and negatives, evaluation batches, then stop.

Sockets: PUSH, connects to layer 0 (batches flow downstream).
         PULL, binds the source address (beliefs flow back from the sink; only with hard negatives).

Batches are drawn exactly as the in-process trainer draws them (same permutation and random negatives
from the same generator), so a pipelined run with random negatives applies the very same updates. Hard
negatives come from the sink's readout belief about each training image, sent back as it is computed; a
batch uses the newest belief the source has received (from the image's previous epoch, since the pipeline
runs ahead of the sink).
"""

from __future__ import annotations

import resource
import signal
import time

import torch
import zmq

from pathlib import Path

from ffpipe import checkpoint, ff, transport
from ffpipe.config import RunConfig
from ffpipe.data import Data, augment, batch_indices, input_stats
from ffpipe.model import label_value, prepare_inputs
from ffpipe.topology import Topology
from ffpipe.wire import Message, WireError

EVAL_BATCH = 250  # images per evaluation message (each carries every label: EVAL_BATCH x C rows)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Source:
    def __init__(self, cfg: RunConfig, data: Data, topo: Topology, peer_timeout_s: float = 120.0, skip: int = 0):
        if cfg.schedule != "joint":
            raise ValueError("the pipeline trains every layer on every batch: use --schedule joint (greedy is in-process only)")
        self.cfg, self.data, self.topo = cfg, data, topo
        self.timeout_ms = int(peer_timeout_s * 1000)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.mean, self.std = input_stats(data, cfg.standardize)
        self.beliefs = torch.zeros(len(data.train), data.num_classes)  # readout logits per training image
        self.stopping = False
        self.seq = 0
        self.sent = {"train": 0, "eval": 0}
        self.skip = skip  # train batches already applied by every layer (resume): drawn again, not sent

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_inputs(images, self.mean, self.std, self.cfg.standardize)

    def _augmented(self, idx: torch.Tensor) -> torch.Tensor:
        return augment(self.data.train.x[idx], self.cfg.shift, self.cfg.flip, self.gen)

    def _negatives(self, idx: torch.Tensor) -> torch.Tensor:
        labels = self.data.train.y[idx]
        if self.cfg.negatives == "hard":
            return ff.hard_wrong_labels(self.beliefs[idx], labels, self.gen)
        return ff.random_wrong_labels(labels, self.data.num_classes, self.gen)

    def train_message(self, epoch: int, idx: torch.Tensor, total: int, batch: int) -> Message:
        cfg, c = self.cfg, self.data.num_classes
        labels = self.data.train.y[idx]
        x = self._inputs(self._augmented(idx))
        value = label_value(x, cfg.label_value)
        neg = self._negatives(idx)
        tensors = {"x_pos": ff.overlay(x, labels, c, value), "x_neg": ff.overlay(x, neg, c, value), "y": labels, "idx": idx}
        if cfg.uses_readout:
            tensors["x_neu"] = ff.overlay(x, None, c, value)
            tensors["feats"] = torch.empty(len(idx), 0)
        return Message("train", self.seq, epoch, {"total": total, "classes": c, "batch": batch}, tensors)

    @property
    def eval_split(self):
        return (self.data.val, "val") if self.data.val is not None else (self.data.test, "test")

    def eval_batches(self) -> int:
        return (len(self.eval_split[0]) + EVAL_BATCH - 1) // EVAL_BATCH

    def eval_messages(self, epoch: int):
        """One evaluation round, built one message at a time (each holds every label of EVAL_BATCH images)."""
        cfg, c = self.cfg, self.data.num_classes
        split, name = self.eval_split
        starts = range(0, len(split), EVAL_BATCH)
        for k, i in enumerate(starts):
            images, labels = split.x[i : i + EVAL_BATCH], split.y[i : i + EVAL_BATCH]
            x = self._inputs(images)
            value = label_value(x, cfg.label_value)
            tensors = {"x_all": ff.overlay_all_labels(x, c, value), "goodness": torch.zeros(len(labels), c), "y": labels}
            if cfg.uses_readout:
                tensors["x_neu"] = ff.overlay(x, None, c, value)
                tensors["feats"] = torch.empty(len(labels), 0)
            scalars = {"split": name, "round": epoch, "batches": len(starts), "part": k, "classes": c, "final": epoch == cfg.epochs}
            yield Message("eval", 0, epoch, scalars, tensors)

    def _send(self, sock: zmq.Socket, msg: Message) -> None:
        msg.seq = self.seq
        transport.send(sock, msg, self.timeout_ms)
        self.seq += 1
        if msg.kind in self.sent:
            self.sent[msg.kind] += 1

    def _drain_beliefs(self, inbox: zmq.Socket | None) -> None:
        while inbox is not None and inbox.poll(0, zmq.POLLIN):
            try:
                msg = transport.recv(inbox, 0)
            except WireError as e:
                print(f"ffpipe source: rejected a malformed belief message: {e}", flush=True)
                continue
            if msg is None or msg.kind != "beliefs":
                continue
            idx, logits = msg.tensors.get("idx"), msg.tensors.get("logits")
            n, c = self.beliefs.shape
            if (idx is None or logits is None or idx.dtype != torch.int64 or idx.ndim != 1 or logits.shape != (len(idx), c)
                    or (len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n))):
                print("ffpipe source: rejected a belief message with bad idx/logits", flush=True)
                continue
            self.beliefs[idx] = logits.float()

    def run(self) -> dict:
        cfg = self.cfg
        links = transport.Links(self.topo.keys)
        out = links.push(self.topo.layers[0].connect_url(), linger_ms=self.timeout_ms)
        inbox = links.pull(self.topo.source.bind_url(self.topo.bind_host)) if cfg.negatives == "hard" else None
        n = len(self.data.train)
        total = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
        drawn = 0  # train batches drawn so far, sent or (when resuming) skipped
        per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
        try:
            for epoch in range(cfg.epochs):
                for idx in batch_indices(n, cfg.batch_size, self.gen):
                    if self.stopping:
                        break
                    drawn += 1
                    if drawn <= self.skip:  # same draws from the generator, same seq numbers, nothing sent
                        self._augmented(idx)
                        self._negatives(idx)
                        self.seq += 1
                        continue
                    self._drain_beliefs(inbox)
                    self._send(out, self.train_message(epoch, idx, total, drawn))
                if self.stopping:
                    break
                if epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                    if (epoch + 1) * per_epoch < self.skip:  # the run went past this evaluation before it stopped
                        self.seq += self.eval_batches()
                        continue
                    for msg in self.eval_messages(epoch + 1):
                        if self.stopping:
                            break
                        self._send(out, msg)
            stats = {"source.sent_train": self.sent["train"], "source.sent_eval": self.sent["eval"],
                     "source.peak_rss_mb": round(peak_rss_mb(), 1), "source.interrupted": self.stopping,
                     "source.cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 3)}
            self._send(out, Message("stop", 0, 0, stats))
        finally:
            out.close()  # lingers until the stop message is delivered (or the peer timeout passes)
            if inbox is not None:
                inbox.close()
            links.close()
        return {"sent_train": self.sent["train"], "sent_eval": self.sent["eval"], "interrupted": self.stopping}


def applied_by_every_layer(out: Path, num_layers: int) -> int:
    """How many train batches every layer checkpoint in `out` has applied (where a resumed run starts)."""
    counts = []
    for i in range(num_layers):
        path = out / f"layer{i}.pt"
        counts.append(checkpoint.load(path)["applied"] if path.is_file() else 0)
    return min(counts)


def run_source(cfg: RunConfig, data: Data, topo: Topology, resume: bool = False) -> dict:
    skip = applied_by_every_layer(Path(cfg.out), len(cfg.layers)) if resume else 0
    if skip:
        print(f"ffpipe source: resuming after {skip} train batches", flush=True)
    source = Source(cfg, data, topo, skip=skip)

    def request_stop(signum, frame):  # SIGTERM/SIGINT: stop sending batches, send stop, exit cleanly
        source.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    t0 = time.perf_counter()
    result = source.run()
    print(f"ffpipe source: sent {result['sent_train']} train and {result['sent_eval']} eval batches in "
          f"{time.perf_counter() - t0:.1f}s" + (" (interrupted)" if result["interrupted"] else ""), flush=True)
    return result
