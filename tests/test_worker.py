"""A layer worker on real sockets: valid batches are applied and forwarded, malformed ones counted, never fatal."""

import threading

import msgpack
import pytest
import torch
import zmq

from ffpipe import checkpoint, config, ff, transport
from ffpipe.layer import local_update, make_layer, make_optimizer
from ffpipe.topology import Topology
from ffpipe.wire import Message


@pytest.fixture(params=["loss read first", "step skipped on the device"])
def worker_link(request, tmp_path, monkeypatch):
    """Layer 0 of a two-layer net served by a Worker thread; yields (cfg, push into it, pull from it). Twice: as on
    the CPU, and with the update's non-finite loss skipped by the optimizer on the device as on a GPU (whose path
    this runs with the CPU's fused kernels)."""
    from ffpipe import layer
    from ffpipe.worker import Worker

    if request.param == "step skipped on the device":
        monkeypatch.setattr(layer, "READ_LOSS_FIRST", ())

    cfg = config.preset("quick", layers=(16, 8), epochs=1, negatives="random", out=str(tmp_path))
    topo = Topology.local(2)
    worker = Worker(cfg, 0, topo, tmp_path, peer_timeout_s=20)
    thread = threading.Thread(target=worker.run, daemon=True)
    ctx = zmq.Context()
    downstream = transport.pull(ctx, topo.layers[1].bind_url("127.0.0.1"))
    thread.start()
    upstream = transport.push(ctx, topo.layers[0].connect_url(), linger_ms=0)
    yield cfg, worker, upstream, downstream
    worker.stopping = True
    thread.join(timeout=10)
    upstream.close()
    downstream.close()
    ctx.term()


def _train(batch: int, x_pos, x_neg) -> Message:
    b = len(x_pos)
    return Message("train", batch, 0, {"total": 3, "classes": 10, "batch": batch},
                   {"x_pos": x_pos, "x_neg": x_neg, "y": torch.zeros(b, dtype=torch.long), "idx": torch.arange(b)})


def _garbage(sock, frames):
    sock.send_multipart(frames)


@pytest.mark.timeout(60)
def test_malformed_messages_are_counted_and_the_worker_keeps_training(worker_link, tmp_path):
    cfg, worker, up, down = worker_link
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 20, generator=gen), torch.randn(5, 20, generator=gen)) for _ in range(3)]
    head = {"v": 1, "kind": "train", "seq": 0, "epoch": 0, "scalars": {}, "tensors": [["x_pos", "float32", [5, 20]]]}
    bad = [
        [b"\x00garbage"],                                                             # not msgpack
        [msgpack.packb({**head, "v": 9}), bytes(400)],                                # wrong version
        [msgpack.packb({**head, "kind": "exec"}), bytes(400)],                        # unknown kind
        [msgpack.packb(head), bytes(10)],                                             # frame too short
        [msgpack.packb({**head, "tensors": [["x_pos", [], [1]]]}), b""],              # dtype not a string
        [msgpack.packb({**head, "tensors": [["x_pos", "float32", [0, 2**62]]]}), b""],  # absurd shape
    ]
    transport.send(up, _train(1, *batches[0]), 5000)
    for frames in bad:
        _garbage(up, frames)
    # every random tensor comes from `gen`: the worker thread builds its layer under torch.manual_seed on the
    # process-wide generator, and a draw from it here at that moment would change the layer's initial weights
    wrong_dtype = [torch.randn(5, 20, generator=gen).double() for _ in range(2)]
    wrong_width = [torch.randn(5, 21, generator=gen) for _ in range(2)]
    transport.send(up, _train(2, *wrong_dtype), 5000)  # wrong dtype
    transport.send(up, _train(3, *wrong_width), 5000)  # wrong width
    nan, inf = batches[1][0].clone(), batches[1][1].clone()
    nan[0, 0], inf[3, 7] = float("nan"), float("inf")
    transport.send(up, _train(2, nan, batches[1][1]), 5000)  # NaN in the next batch: its update refuses it
    transport.send(up, _train(2, batches[1][0], inf), 5000)  # Inf, likewise
    transport.send(up, _train(2, batches[1][0] * 1e30, batches[1][1]), 5000)  # finite, but too large to normalize
    transport.send(up, _train(1, nan, batches[0][1]), 5000)  # NaN in a batch only forwarded: refused by its own check
    transport.send(up, _train(2, *batches[1]), 5000)
    transport.send(up, _train(2, *batches[1]), 5000)  # the same batch again: forwarded, not applied twice
    transport.send(up, _train(3, *batches[2]), 5000)
    transport.send(up, Message("stop", 9, 0, {"source.sent_train": 3}), 5000)

    outputs = [transport.recv(down, 10_000) for _ in range(5)]
    assert [m.kind for m in outputs] == ["train"] * 4 + ["stop"]
    assert [m.scalars["batch"] for m in outputs[:4]] == [1, 2, 2, 3]
    stop = outputs[-1].scalars
    assert stop["layer0.applied"] == 3 and stop["layer0.replayed"] == 1
    assert stop["layer0.rejected"] == len(bad) + 6  # a batch the layer cannot normalize is refused: it has not diverged
    assert "train batch refused: the loss is not finite" in stop["layer0.rejected_reasons"]
    assert stop["source.sent_train"] == 3

    # the layer applied exactly batches 1, 2, 3 once each, as local_update would in one process
    reference = make_layer(0, 20, 16, cfg.layer, cfg.seed)
    opt = make_optimizer(reference.parameters(), cfg.optim)
    opt.param_groups[0]["lr"] = cfg.optim.lr * ff.lr_factor(0, cfg.epochs, cfg.optim.schedule)
    for x_pos, x_neg in batches:
        local_update(reference, opt, x_pos, x_neg)
    saved = checkpoint.load(tmp_path / "layer0.pt")
    assert saved["applied"] == 3 and saved["last_batch"] == 3
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(saved["layer"][key], value)


@pytest.mark.timeout(60)
def test_a_first_batch_its_update_refuses_builds_no_layer_and_images_with_nan_are_refused(worker_link):
    cfg, worker, up, down = worker_link
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(5, 24, generator=gen)
    wide[4, 23] = float("inf")
    transport.send(up, _train(1, wide, torch.randn(5, 24, generator=gen)), 5000)  # refused: it must leave no layer
    transport.send(up, _train(1, *(torch.randn(5, 20, generator=gen) for _ in range(2))), 5000)  # so width 20 fits
    images = torch.rand(5, 20, generator=gen)
    images[0, 19] = float("nan")
    as_the_source_sends = {"y": torch.zeros(5, dtype=torch.long), "neg": torch.ones(5, dtype=torch.long), "idx": torch.arange(5)}
    transport.send(up, Message("train", 2, 0, {"total": 3, "classes": 10, "batch": 2}, {"x": images, **as_the_source_sends}), 5000)
    transport.send(up, Message("stop", 9, 0, {"source.interrupted": True}), 5000)  # forged: no count of batches sent
    transport.send(up, Message("stop", 9, 0, {"source.sent_train": 0}), 5000)  # forged: fewer than the layer applied
    transport.send(up, Message("stop", 9, 0, {"source.sent_train": 2}), 5000)  # the source's: batch 2 went, refused
    outputs = [transport.recv(down, 10_000) for _ in range(2)]
    assert [m.kind for m in outputs] == ["train", "stop"] and outputs[0].scalars["batch"] == 1
    stop = outputs[1].scalars
    assert stop["layer0.applied"] == 1 and stop["layer0.rejected"] == 4
    assert "a stop must name the source's train batches sent, at least the 1 this layer has applied" in stop["layer0.rejected_reasons"]
    assert "train batch refused: the loss is not finite" in stop["layer0.rejected_reasons"]


def test_an_image_layer_is_sized_from_the_shape_the_batch_names(tmp_path):
    from ffpipe.wire import WireError
    from ffpipe.worker import Worker

    cfg = config.preset("quick", layers=("conv4k3p2", 16), epochs=1, negatives="random", out=str(tmp_path))

    def batch(width, shape, classes=10):
        m = _train(1, torch.rand(2, width), torch.rand(2, width))
        m.scalars.update(shape=shape, classes=classes)
        return m

    with pytest.raises(WireError, match=r"\(C, H, W\)"):  # layer 1 of an image net cannot size itself without it
        Worker(cfg, 1, Topology.local(2), tmp_path).on_train(batch(4 * 4 * 4, None))
    with pytest.raises(WireError, match="takes 64"):  # 1x8x8 -> conv4, pooled 4x4
        Worker(cfg, 1, Topology.local(2), tmp_path).on_train(batch(65, "1x8x8"))
    with pytest.raises(WireError, match="shape must"):
        Worker(cfg, 0, Topology.local(2), tmp_path).on_train(batch(64, "8x8"))
    with pytest.raises(WireError, match="number of classes"):
        Worker(cfg, 0, Topology.local(2), tmp_path).on_train(batch(64, "1x8x8", classes=True))
    layer1 = Worker(cfg, 1, Topology.local(2), tmp_path)
    out = layer1.on_train(batch(64, "1x8x8"))
    assert out.tensors["x_pos"].shape == (2, 16) and layer1.layer.in_features == 64


def test_only_the_last_layer_leaves_the_activations_out_for_the_sink(tmp_path):
    from ffpipe.worker import Worker

    cfg = config.preset("quick", layers=(16, 8), epochs=1, negatives="random", out=str(tmp_path))
    topo = Topology.local(2)
    msg = Message("train", 3, 0, {"batch": 3, "loss.1": 0.5},
                  {"x_pos": torch.ones(2, 8), "x_neg": torch.zeros(2, 8), "x_neu": torch.ones(2, 8),
                   "feats": torch.ones(2, 24), "y": torch.zeros(2, dtype=torch.long), "idx": torch.arange(2)})
    to_layer1 = Worker(cfg, 0, topo, tmp_path / "a", peer_timeout_s=5)._for_next(msg)
    to_sink = Worker(cfg, 1, topo, tmp_path / "b", peer_timeout_s=5)._for_next(msg)
    assert to_layer1 is msg
    assert set(to_sink.tensors) == {"feats", "y", "idx"}  # what the sink reads: readout features and labels
    assert (to_sink.kind, to_sink.seq, to_sink.scalars) == ("train", 3, msg.scalars)


def test_layer_0_writes_the_labels_into_images_sent_once_exactly_as_into_overlaid_inputs(tmp_path):
    from ffpipe.wire import WireError
    from ffpipe.worker import Worker

    cfg = config.preset("quick", layers=(16, 8), epochs=1, negatives="hard", out=str(tmp_path))  # hard: a readout too
    assert cfg.uses_readout
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 20, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    neg = ff.random_wrong_labels(y, 10, gen)
    scalars = {"total": 3, "classes": 10, "batch": 1}
    common = {"y": y, "idx": torch.arange(6), "feats": torch.empty(6, 0)}
    once = Message("train", 1, 0, scalars, {"x": x, "neg": neg, **common})
    overlaid = Message("train", 1, 0, scalars, {"x_pos": ff.overlay(x, y, 10), "x_neg": ff.overlay(x, neg, 10),
                                                "x_neu": ff.overlay(x, None, 10), **common})
    a, b = Worker(cfg, 0, Topology.local(2), tmp_path / "a"), Worker(cfg, 0, Topology.local(2), tmp_path / "b")
    out_a, out_b = a.on_train(once), b.on_train(overlaid)
    assert set(out_a.tensors) == set(out_b.tensors) == {"x_pos", "x_neg", "x_neu", "feats", "y", "idx"}
    for k in out_a.tensors:
        assert torch.equal(out_a.tensors[k], out_b.tensors[k]), k
    for k, v in a.layer.state_dict().items():
        assert torch.equal(v, b.layer.state_dict()[k]), k

    evaluation = {"split": "val", "round": 1, "batches": 1, "part": 0, "classes": 10, "final": False}
    e_a = a.on_eval(Message("eval", 2, 1, evaluation, {"x": x, "goodness": torch.zeros(6, 10), "y": y, "feats": torch.empty(6, 0)}))
    e_b = b.on_eval(Message("eval", 2, 1, evaluation, {"x_all": ff.overlay_all_labels(x, 10), "x_neu": ff.overlay(x, None, 10),
                                                       "goodness": torch.zeros(6, 10), "y": y, "feats": torch.empty(6, 0)}))
    for k in e_a.tensors:
        assert torch.equal(e_a.tensors[k], e_b.tensors[k]), k

    def train(**tensors):
        return Message("train", 2, 0, {**scalars, "batch": 2}, {"x": x, "neg": neg, **common, **tensors})

    for bad, match in [(train(neg=neg + 10), "neg must be int64"), (train(neg=neg.int()), "neg must be int64"),
                       (train(y=y[:3]), "y must be int64"), (train(x=x.double()), "x must be a non-empty float32")]:
        with pytest.raises(WireError, match=match):
            a.on_train(bad)
    assert a.applied == 1  # none of them was applied


def _images(batch: int, x: torch.Tensor, classes: int = 10, shape: str | None = "1x8x8") -> Message:
    """A train batch as the source sends it to layer 0: the images, their labels and the wrong labels."""
    b = len(x)
    y = torch.arange(b) % classes
    return Message("train", batch, 0, {"total": 9, "classes": classes, "batch": batch, **({"shape": shape} if shape else {})},
                   {"x": x, "y": y, "neg": (y + 1) % classes, "idx": torch.arange(b)})


def test_an_image_layer_resumes_from_its_checkpoint_with_its_shape_and_classes(tmp_path):
    from ffpipe.worker import Worker

    cfg = config.preset("quick", layers=("conv12k3", 8), epochs=1, layer=config.LayerConfig(loss="competitive"), out=str(tmp_path))
    worker = Worker(cfg, 0, Topology.local(2), tmp_path, peer_timeout_s=5)
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 2):
        worker.on_train(_images(batch, torch.rand(6, 64, generator=gen)))
    worker.save()
    again = Worker(cfg, 0, Topology.local(2), tmp_path, peer_timeout_s=5)
    again.load()  # the checkpoint alone says the layer sees 1x8x8 images of 10 classes
    assert (again.shape, again.classes, again.last_batch) == ("1x8x8", 10, 2)
    assert all(torch.equal(a, b) for a, b in zip(worker.layer.state_dict().values(), again.layer.state_dict().values(), strict=True))
    x = torch.rand(6, 64, generator=gen)
    assert torch.equal(again.on_train(_images(3, x)).tensors["x_pos"], worker.on_train(_images(3, x)).tensors["x_pos"])


@pytest.mark.parametrize("classes, width, message", [(10, 5, "cannot hold 10 labels"), (3, 64, "a batch of 3 classes, layer 0 has 10"),
                                                      (10, 49, "a batch of width 49, layer 0 takes 64")])
def test_layer_0_refuses_images_it_cannot_write_the_labels_into(tmp_path, classes, width, message):
    from ffpipe.wire import WireError
    from ffpipe.worker import Worker

    cfg = config.preset("quick", layers=(16, 8), epochs=1, negatives="random", out=str(tmp_path))
    worker = Worker(cfg, 0, Topology.local(2), tmp_path, peer_timeout_s=5)
    if width >= classes:  # a layer built for 64 inputs and 10 classes
        worker.on_train(_images(1, torch.rand(4, 64), shape=None))
    with pytest.raises(WireError, match=message):
        worker.on_train(_images(2 if width >= classes else 1, torch.rand(4, width), classes, shape=None))
