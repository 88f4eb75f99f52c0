"""Checkpoints: round trip, the content digest refuses corrupt and tampered files, v1 files still load."""

import subprocess
import sys
import zipfile

import pytest
import torch

from ffpipe import checkpoint
from ffpipe.checkpoint import CheckpointError


def _payload() -> dict:
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()  # momentum buffers: the optimizer state holds tensors under integer keys
    return {"config": {"layers": [3], "lr": 0.1, "name": "x", "flag": True, "none": None},
            "layer": layer.state_dict(), "optimizer": opt.state_dict(), "applied": 7,
            "marker": torch.arange(64, dtype=torch.float32) + 0.5, "rng": torch.Generator().manual_seed(0).get_state(),
            "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "half": torch.ones(3, dtype=torch.bfloat16)}


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_keeps_every_value_and_plain_torch_load_reads_it(tmp_path):
    path = tmp_path / "ck.pt"
    payload = _payload()
    checkpoint.save(path, payload)
    back = checkpoint.load(path)
    assert back["format"] == checkpoint.FORMAT and back["sha256"] == checkpoint.digest(payload)
    _assert_same({k: v for k, v in back.items() if k not in ("format", "sha256")}, payload)
    plain = torch.load(path, weights_only=True)  # no ffpipe needed to read the file
    assert plain["sha256"] == back["sha256"]
    assert checkpoint.load(tmp_path / "ck.pt") and checkpoint.resolve(tmp_path) == tmp_path / checkpoint.FILENAME


def test_the_digest_sees_every_tensor_byte_dtype_shape_and_value():
    base = checkpoint.digest({"t": torch.zeros(2, 3), "n": 1})
    assert base == checkpoint.digest({"n": 1, "t": torch.zeros(2, 3)})  # key order does not matter
    assert base == checkpoint.digest({"t": torch.zeros(3, 2).T, "n": 1}) != checkpoint.digest({"t": torch.zeros(3, 2), "n": 1})
    for other in ({"t": torch.zeros(2, 3, dtype=torch.float64), "n": 1}, {"t": torch.zeros(6), "n": 1},
                  {"t": torch.zeros(2, 3), "n": 1.0}, {"t": torch.zeros(2, 3), "n": True}, {"t": torch.zeros(2, 3), "n": "1"},
                  {"t": torch.zeros(2, 3), "n": 1, "m": None}):
        assert checkpoint.digest(other) != base, other
    t = torch.zeros(2, 3)
    t[1, 2] = 2.0**-140  # one bit of one element
    assert checkpoint.digest({"t": t, "n": 1}) != base


def test_a_flipped_byte_inside_a_tensor_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    payload = _payload()
    checkpoint.save(path, payload)
    with zipfile.ZipFile(path) as z:  # torch stores records uncompressed, so the tensor's bytes are in the file as is
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
    raw = bytearray(path.read_bytes())
    marker = payload["marker"].numpy().tobytes()
    at = raw.find(marker)
    assert at >= 0 and raw.count(marker) == 1
    raw[at + 101] ^= 0x01
    path.write_bytes(raw)
    flipped = torch.load(path, weights_only=True)["marker"]  # torch.load alone does not notice (it skips the zip CRC)
    assert not torch.equal(flipped, payload["marker"])
    with pytest.raises(CheckpointError, match="checksum mismatch: the file is corrupt"):
        checkpoint.load(path)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save(path, _payload())
    raw = path.read_bytes()
    for keep in (len(raw) // 2, len(raw) - 1, 10, 0):
        path.write_bytes(raw[:keep])
        with pytest.raises(CheckpointError, match="corrupt|unreadable"):
            checkpoint.load(path)


def test_what_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        checkpoint.load(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        checkpoint.load(tmp_path / "text.pt")
    for i, obj in enumerate(({"weights": torch.ones(2)}, [1, 2], {"format": "someone-else-1"})):
        torch.save(obj, tmp_path / f"{i}.pt")
        with pytest.raises(CheckpointError, match="not an ffpipe checkpoint"):
            checkpoint.load(tmp_path / f"{i}.pt")


def test_a_version_1_file_without_digest_still_loads_but_a_version_2_file_needs_one(tmp_path):
    payload = _payload()
    torch.save({"format": "ffpipe-checkpoint-1", **payload}, tmp_path / "v1.pt")  # what the previous release wrote
    back = checkpoint.load(tmp_path / "v1.pt")
    assert back["format"] == "ffpipe-checkpoint-1" and "sha256" not in back
    _assert_same({k: v for k, v in back.items() if k != "format"}, payload)
    torch.save({"format": checkpoint.FORMAT, **payload}, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(tmp_path / "v2.pt")


def test_a_tampered_payload_under_the_old_digest_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save(path, _payload())
    saved = torch.load(path, weights_only=True)
    saved["layer"]["weight"][0, 0] += 1.0  # a different value, re-saved with the old digest kept
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="checksum mismatch: the file is corrupt"):
        checkpoint.load(path)
    saved = torch.load(path, weights_only=True)
    saved["applied"] = 8  # a plain value counts too
    saved["layer"]["weight"][0, 0] -= 1.0
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(path)


def test_save_leaves_no_temporary_file_and_replaces_the_old_checkpoint(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    checkpoint.save(path, {"applied": 1})
    checkpoint.save(path, {"applied": 2})
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]
    assert checkpoint.load(path)["applied"] == 2
    with pytest.raises(TypeError, match="not object"):  # a value the digest cannot canonicalize: nothing written
        checkpoint.save(path, {"applied": 3, "bad": object()})
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"] and checkpoint.load(path)["applied"] == 2


def test_save_deletes_the_temporary_files_of_writers_that_died_mid_write_and_only_those(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (reused within this test only by an unlucky wrap-around)
    alive = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])  # until killed
    try:
        path = tmp_path / "layer0.pt"
        stale, live = tmp_path / f"layer0.pt.{dead.pid}.1.tmp", tmp_path / f"layer0.pt.{alive.pid}.1.tmp"
        other = tmp_path / f"layer1.pt.{dead.pid}.1.tmp"  # another file's: its own writer cleans it
        for f in (stale, live, other):
            f.write_bytes(b"half a checkpoint")
        checkpoint.save(path, {"applied": 1})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["layer0.pt", live.name, other.name])
    finally:
        alive.kill()
        alive.wait()


def test_a_background_write_saves_the_state_as_it_was_when_submitted(tmp_path):
    path = tmp_path / "ck.pt"
    payload = _payload()
    expected = checkpoint.snapshot(payload)
    writer, done = checkpoint.BackgroundWriter(), []
    writer.submit(path, checkpoint.snapshot(payload), lambda: done.append(path.is_file()))
    payload["marker"].add_(100.0)  # training goes on, in place, while the file is written
    for state in payload["optimizer"]["state"].values():
        state["momentum_buffer"].mul_(-1)
    writer.wait()
    assert done == [True]  # told only once the file was there
    loaded = checkpoint.load(path)
    _assert_same({k: v for k, v in loaded.items() if k not in ("format", "sha256")}, expected)
    assert not torch.equal(loaded["marker"], payload["marker"])


def test_a_failed_background_write_is_raised_by_the_next_call_and_reports_nothing_durable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the checkpoint's folder should be")
    writer, done = checkpoint.BackgroundWriter(), []
    writer.submit(blocker / "ck.pt", checkpoint.snapshot(_payload()), lambda: done.append(True))
    with pytest.raises(OSError):
        writer.wait()
    assert done == []
    writer.wait()  # the error is raised once
    writer.submit(tmp_path / "ck.pt", checkpoint.snapshot(_payload()), lambda: done.append(True))
    writer.wait()
    assert done == [True] and checkpoint.load(tmp_path / "ck.pt")["applied"] == 7


class _NotData:  # a class torch.load(weights_only=True) refuses to build
    pass


def test_a_file_that_is_not_a_checkpoint_or_for_another_device_is_refused_in_one_line(tmp_path):
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"obj": _NotData()}, tmp_path / "pickled.pt")
    for name in ("noise.pt", "pickled.pt"):
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(tmp_path / name)
        text = str(e.value)
        assert "\n" not in text and "weights_only" not in text and "report" not in text, text  # none of torch's advice
    checkpoint.save(tmp_path / "ok.pt", {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        checkpoint.load(tmp_path / "ok.pt", map_location="banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            checkpoint.load(tmp_path / "ok.pt", map_location="cuda")
