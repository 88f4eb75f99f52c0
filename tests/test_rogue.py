"""A rogue client on a running pipeline's open ports: malformed messages pushed into layer 0, the sink and the source are each
rejected and counted once where they arrive, and change nothing: the run completes, every batch is applied once by
every layer, and the model equals the in-process reference run of the same config."""

import json
import random
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from torch.testing import assert_close
from typer.testing import CliRunner

from ffpipe import checkpoint, config
from ffpipe.cli import app
from ffpipe.topology import Topology
from ffpipe.wire import Message, WireError, decode, encode
from ffpipe.worker import Worker
from test_pipeline import _wait_until

EPOCHS, BATCHES = 10, 10 * 29  # 1,437 digits in batches of 50
WIDTHS = (32, 32)
REPEAT = 10  # copies of each malformed message
IN = 64  # layer 0's width: 8x8 digits, the label overlaid on the first pixels


def _config(tmp_path: Path) -> Path:
    # log_every=1: the sink writes a train record for the very first batch, which tells the test layer 0 is built
    cfg = config.preset("quick", dataset="digits", layers=WIDTHS, epochs=EPOCHS, batch_size=50, eval_every=0,
                        negatives="random", predict="goodness", seed=5, threads=1, log_every=1)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    return path


def _header(**fields) -> bytes:
    return msgpack.packb({"v": 1, "kind": "train", "seq": 1, "epoch": 0, "scalars": {}, "tensors": [], **fields})


def _frames(kind: str, scalars: dict, **tensors) -> list[bytes]:
    return [bytes(f) for f in encode(Message(kind, 1, 0, scalars, tensors))]


def _train(width: int, rows: int = 4, **changes) -> list[bytes]:
    """A train batch as a layer receives it, of any width."""
    t = {"x_pos": torch.rand(rows, width), "x_neg": torch.rand(rows, width), "y": torch.zeros(rows, dtype=torch.int64),
         "idx": torch.arange(rows), **changes}
    return _frames("train", {"batch": 1, "total": BATCHES, "classes": 10}, **t)


def _undecodable(rng: random.Random) -> dict[str, list[bytes]]:
    """What the wire decoder refuses, wherever it arrives."""
    nan = torch.rand(4, IN)
    nan[2, 5] = float("nan")
    return {
        "garbage": [b"\xc1" + rng.randbytes(rng.randrange(0, 200))],
        "garbage frames": [rng.randbytes(16), rng.randbytes(3), b""],
        "missing frame": _train(IN)[:-1],
        "extra frame": _train(IN) + [b"\x00" * 8],
        "unknown kind": [_header(kind="exec")],
        "bad version": [_header(v=2)],
        "unsupported dtype": [_header(tensors=[["x", "complex64", [2]]]), bytes(16)],
        "size mismatch": [_header(tensors=[["x", "float32", [2, 3]]]), bytes(20)],
        "absurd size": [_header(tensors=[["x", "float32", [2**30, 2**30]]]), b""],
        "absurd empty": [_header(tensors=[["x", "float32", [0, 2**31 - 1, 2**31 - 1, 4]]]), b""],  # crashed decode once
        "nan": _train(IN, x_pos=nan),
    }


def _for_layer0(rng: random.Random) -> dict[str, list[bytes]]:
    """Well-formed frames that layer 0 must refuse: wrong width, wrong kind, inconsistent shapes, missing tensors."""
    return {**_undecodable(rng),
            "wrong width": _train(7),
            "not for a layer": _frames("beliefs", {}, idx=torch.zeros(2, dtype=torch.int64), logits=torch.zeros(2, 10)),
            "eval rows": _frames("eval", {"round": 1, "batches": 1, "classes": 10}, x_all=torch.rand(5, IN),
                                 goodness=torch.zeros(2, 10), y=torch.zeros(2, dtype=torch.int64)),
            "no labels": _frames("train", {"batch": 1, "total": BATCHES}, x_pos=torch.rand(4, IN), x_neg=torch.rand(4, IN))}


def _for_sink(rng: random.Random) -> dict[str, list[bytes]]:
    """Well-formed frames that the sink must refuse: features of the wrong width, labels out of range, wrong shapes."""
    y = torch.tensor([1, 2, 3])
    return {**_undecodable(rng),
            "feats width": _frames("train", {"batch": 1, "total": BATCHES, "classes": 10}, y=y, idx=y, feats=torch.rand(3, 5)),
            "feats huge": _frames("train", {"batch": 1, "total": BATCHES, "classes": 10}, y=y, idx=y,  # finite, too large
                                  feats=torch.full((3, WIDTHS[1]), 1e30)),
            "labels": _frames("train", {"batch": 1, "total": BATCHES, "classes": 10}, y=torch.tensor([1, 99, 3]), idx=y),
            "eval shape": _frames("eval", {"round": 1, "batches": 1, "classes": 10, "split": "test"}, y=y,
                                  goodness=torch.zeros(3, 4)),
            "not for the sink": _frames("beliefs", {}, idx=y, logits=torch.zeros(3, 10))}


def _for_source(rng: random.Random) -> dict[str, list[bytes]]:
    """Well-formed frames that the source must refuse: beliefs (the sink's readout logits, for hard negatives) that
    are not finite, or would not be once made float32, or name images that do not exist; an ack without its fields."""
    idx = torch.tensor([1, 2, 3])
    inf = torch.zeros(3, 10)
    inf[1, 4] = float("inf")
    return {"float64 beliefs": _frames("beliefs", {}, idx=idx, logits=torch.full((3, 10), 1e300, dtype=torch.float64)),
            "inf beliefs": _frames("beliefs", {}, idx=idx, logits=inf),
            "beliefs idx": _frames("beliefs", {}, idx=torch.tensor([1, 10**6, 3]), logits=torch.zeros(3, 10)),
            "beliefs width": _frames("beliefs", {}, idx=idx, logits=torch.zeros(3, 7)),
            "ack fields": _frames("ack", {"next": -1}),
            "not for the source": _train(IN),
            **_undecodable(rng)}  # after the others: a role names at most 20 reasons, and random bytes make many


def _push_all(endpoints: dict[str, str], batches: dict[str, list[list[bytes]]]) -> None:
    """Connect a PUSH socket to each endpoint, queue every message, and return once ZeroMQ has delivered them all."""
    ctx = zmq.Context()
    try:
        for name, messages in batches.items():
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)  # queue everything here; the receivers' high-water marks pace delivery
            sock.setsockopt(zmq.LINGER, 30_000)
            sock.connect(f"tcp://{endpoints[name]}")
            for frames in messages:
                sock.send_multipart(frames)
            sock.close()  # lingers: ctx.term() below returns when everything queued has been sent
    finally:
        ctx.term()


def _training(out: Path):
    def started() -> bool:
        m = out / "metrics.jsonl"
        return (out / "run.json").is_file() and m.is_file() and '"kind": "train"' in m.read_text()
    return started


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_malformed_messages_from_a_rogue_client_are_counted_and_change_nothing(tmp_path):
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ffpipe", "run", "--config", str(cfg), "--quiet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_until(proc, _training(out), timeout=90)  # layer 0 has taken its width from the first batch
        topology = json.loads((out / "run.json").read_text())["topology"]
        rng = random.Random(0)
        batches = {"layer0": [f for _ in range(REPEAT) for f in _for_layer0(rng).values()],
                   "sink": [f for _ in range(REPEAT) for f in _for_sink(rng).values()],
                   "source": [f for _ in range(REPEAT) for f in _for_source(rng).values()]}
        _push_all({"layer0": topology["layers"][0], "sink": topology["sink"], "source": topology["source"]}, batches)
        assert proc.poll() is None, "the run ended before the rogue had delivered; make it longer"
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output

    s = json.loads((out / "summary.json").read_text())
    a = s["accounting"]
    assert not s["interrupted"] and a["complete"], a
    assert a["sent_train"] == a["received_train"] == BATCHES and a["applied"] == [BATCHES, BATCHES], a
    sent = {role: len(messages) for role, messages in batches.items()}
    assert a["rejected"] == {"source": sent["source"], "layer0": sent["layer0"], "layer1": 0, "sink": sent["sink"]}, (sent, a["rejected_reasons"])
    said = [line for line in output.splitlines() if line.startswith("ffpipe source: rejected a message: ")]
    assert any("'logits' holds NaN or Inf" in line for line in said) and any("float32" in line for line in said), said
    assert len(said) == len(set(said)) <= 20, said  # once per reason
    assert "from 127.0.0.1: " in a["rejected_reasons"]["layer0"]  # each rejection names the sender
    assert sum(a["rejected"].values()) == sum(sent.values()) > 200

    # the same config in one process, which the pipeline reproduces update for update: the rogue changed nothing
    result = CliRunner().invoke(app, ["run", "--inprocess", "--config", str(cfg), "--quiet", "--out", str(tmp_path / "ref")])
    assert result.exit_code == 0, result.output
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert s["test_accuracy"] == pytest.approx(ref["test_accuracy"])
    model, reference = checkpoint.load(out)["model"], checkpoint.load(tmp_path / "ref")["model"]
    assert model.keys() == reference.keys()
    for key in model:
        assert_close(model[key], reference[key], msg=key)


def test_a_malformed_batch_before_the_first_real_one_does_not_decide_layer0s_width(tmp_path):
    cfg = config.RunConfig.from_json(_config(tmp_path).read_text())
    worker = Worker(cfg, 0, Topology.local(len(WIDTHS)), tmp_path)  # no sockets: its handlers are called directly
    rogue = decode(_train(7))
    rogue.scalars.pop("batch")  # malformed twice over: a wrong width and no batch number
    with pytest.raises(WireError):
        worker.on_train(rogue)
    worker.on_train(decode(_train(IN)))
    assert worker.applied == 1


def test_an_eval_before_the_first_batch_is_refused_before_layer0_writes_any_label_into_it(tmp_path, monkeypatch):
    """Before its first train batch layer 0 has no class count to hold a message to, so writing every label into
    an eval batch of up to 100,000 classes and as many inputs (a 40 GB tensor) killed it with an allocation error."""
    from ffpipe import worker as worker_module

    cfg = config.RunConfig.from_json(_config(tmp_path).read_text())
    worker = Worker(cfg, 0, Topology.local(len(WIDTHS)), tmp_path)

    def overlay_all_labels(*args):
        raise AssertionError("wrote the labels into an eval batch before the layer existed")

    monkeypatch.setattr(worker_module.ff, "overlay_all_labels", overlay_all_labels)
    c = 1000
    rogue = decode(_frames("eval", {"round": 1, "batches": 1, "classes": c}, x=torch.rand(1, c), goodness=torch.zeros(1, c),
                           y=torch.zeros(1, dtype=torch.int64)))
    with pytest.raises(WireError, match="before layer 0 has seen its first train batch"):
        worker.on_eval(rogue)
    monkeypatch.undo()
    worker.on_train(decode(_train(IN)))  # the first real batch still decides everything
    assert worker.applied == 1
