"""Crashes and stalls: kill -9 of any role with --restart on-failure, SIGSTOP of a worker.

With restart on, the run must finish with every batch applied exactly once by every layer. A restarted
source or sink leaves the layers untouched, so the final weights must equal an uninterrupted run's. A layer
that died loses what it applied since its checkpoint and what sat in its queues; the batches it (or a layer
after it) then re-learns pass through upstream layers that have already moved on (no activations are stored
anywhere), so for a layer only the accounting and the accuracy are compared.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from torch.testing import assert_close

from ffpipe import checkpoint
from test_pipeline import SMALL, _alive, _cli, _summary, _wait_until

EPOCHS = 12
BATCHES = EPOCHS * 29  # 1,437 digits in batches of 50
ARGS = [*SMALL, "--layers", "64,64", "--epochs", str(EPOCHS), "--eval-every", "3", "--negatives", "random",
        "--checkpoint-every", "10", "--retransmit-after", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    _cli("run", *ARGS, "--out", out)
    return out


def _launch(out, *extra):
    cmd = [sys.executable, "-m", "ffpipe", "run", *ARGS, "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rss_mb(pid: int) -> float:
    return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pid(out, role, index):
    processes = json.loads((out / "run.json").read_text())["processes"]
    return next(p["pid"] for p in processes if p["role"] == role and p["index"] == index)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("role,index", [("layer", 0), ("layer", 1), ("source", None), ("sink", None)])
def test_kill_9_with_restart_applies_every_batch_exactly_once(tmp_path, reference, role, index):
    out = tmp_path / "run"
    proc = _launch(out, "--restart", "on-failure")
    _wait_until(proc, lambda: (out / "layer1.pt").is_file() and (out / "run.json").is_file())  # past a checkpoint
    time.sleep(random.Random(f"{role}{index}").uniform(0.0, 1.0))  # a random point of the run, not a synchronization
    victim = _pid(out, role, index)
    os.kill(victim, signal.SIGKILL)
    output, _ = proc.communicate(timeout=150)
    name = role if index is None else f"{role} {index}"
    assert proc.returncode == 0, output
    assert f"{name} (pid {victim}) died: killed by SIGKILL; restarting it" in output
    s = _summary(out)
    a = s["accounting"]
    assert s["restarts"] == {name: 1} and not s["interrupted"]
    assert a["complete"], a
    assert a["sent_train"] == a["received_train"] == BATCHES and a["applied"] == [BATCHES, BATCHES]
    assert a["lost"] == {"layer0": 0, "layer1": 0} and a["applied_twice"] == {"layer0": 0, "layer1": 0}
    assert [h["epoch"] for h in s["history"]] == [3, 6, 9, 12]  # every evaluation round once, none lost
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if m["kind"] == "eval"] == [3, 6, 9, 12]  # no record written twice
    ref = _summary(reference)
    if role == "layer":  # re-learned batches come through upstream weights that kept learning
        assert abs(s["test_accuracy"] - ref["test_accuracy"]) < 0.05
    else:
        got, want = checkpoint.load(out)["model"], checkpoint.load(reference)["model"]
        for key in want:
            assert_close(got[key], want[key], msg=key)
        assert s["test_accuracy"] == ref["test_accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_without_restart_a_kill_9_stops_everything_and_names_the_role(tmp_path):
    out = tmp_path / "run"
    proc = _launch(out)
    _wait_until(proc, lambda: (out / "layer0.pt").is_file() and (out / "run.json").is_file())
    processes = json.loads((out / "run.json").read_text())["processes"]
    victim = _pid(out, "layer", 0)
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    output, _ = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10, output
    assert proc.returncode == 1 and f"error: layer 0 (pid {victim}) died: killed by SIGKILL; stopped the rest" in output
    assert not any(_alive(p["pid"]) for p in processes)
    checkpoint.load(out / "layer1.pt")  # what the survivors checkpointed is intact


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stopped_worker_holds_the_pipeline_with_memory_bounded_and_it_resumes(tmp_path):
    out = tmp_path / "run"
    proc = _launch(out, "--epochs", "30")
    _wait_until(proc, lambda: (out / "layer0.pt").is_file() and (out / "run.json").is_file())
    pids = {p["role"] + str(p["index"]): p["pid"] for p in json.loads((out / "run.json").read_text())["processes"]}
    before = {k: rss_mb(pid) for k, pid in pids.items()}
    os.kill(pids["layer1"], signal.SIGSTOP)
    try:
        peaks = dict(before)
        for _ in range(15):  # three seconds stopped, while everyone upstream keeps trying
            time.sleep(0.2)
            peaks = {k: max(peaks[k], rss_mb(pid)) for k, pid in pids.items()}
        metrics = (out / "metrics.jsonl").read_text()
    finally:
        os.kill(pids["layer1"], signal.SIGCONT)
    output, _ = proc.communicate(timeout=100)
    assert proc.returncode == 0, output
    # backpressure: the queues are bounded, so nobody buffers the batches the stopped layer did not take
    for k in pids:
        assert peaks[k] < before[k] + 30, (k, before, peaks)
    assert (out / "metrics.jsonl").read_text().startswith(metrics)
    s = _summary(out)
    assert s["accounting"]["complete"] and s["accounting"]["applied"] == [30 * 29] * 2


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_corrupt_checkpoint_is_refused_by_resume_and_eval_with_one_line(tmp_path):
    import torch

    out = tmp_path / "run"
    _cli("run", *ARGS, "--epochs", "1", "--out", out)
    weights = checkpoint.load(out / "layer0.pt")["layer"]["linear.weight"]
    for path in (out / "layer0.pt", out / "checkpoint.pt"):  # flip one bit of layer 0's weights in each file
        raw = bytearray(path.read_bytes())
        at = raw.find(weights.numpy().tobytes()[:4096])
        assert at >= 0
        raw[at + 123] ^= 0x04
        path.write_bytes(raw)
        assert not torch.equal(torch.load(path, weights_only=True)["layer" if "layer0" in path.name else "model"][
            "linear.weight" if "layer0" in path.name else "layers.0.linear.weight"], weights)  # torch.load alone loads it
    result = subprocess.run([sys.executable, "-m", "ffpipe", "run", "--resume", str(out), "--epochs", "2", "--quiet"],
                            capture_output=True, text=True, timeout=100)
    assert result.returncode != 0
    assert f"{out / 'layer0.pt'}: checksum mismatch: the file is corrupt" in result.stdout + result.stderr
    result = subprocess.run([sys.executable, "-m", "ffpipe", "eval", "--checkpoint", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "checksum mismatch" in result.stderr and len(result.stderr.strip().splitlines()) == 1
