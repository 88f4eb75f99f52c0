"""The pipeline: one process per layer over ZeroMQ, against the in-process reference; shutdown and failure."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from typer.testing import CliRunner

from ffpipe import checkpoint
from ffpipe.cli import app
from ffpipe.serve import load_model

runner = CliRunner()
SMALL = ["--dataset", "digits", "--batch-size", "50", "--quiet"]


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


WHITENED = ["--standardize", "--whiten", "0.1"]


@pytest.mark.parametrize("inputs", [["--shift", "1"], ["--shift", "1", *WHITENED], ["--flip", *WHITENED]],
                         ids=["plain", "whitened", "whitened-prepared-once"])
def test_pipeline_applies_the_same_updates_as_in_process(tmp_path, inputs, capfd):
    # with augmentation on, so the source must draw shifts and flips from the generator exactly as the trainer does;
    # whitened, the source's ZCA fit (saved in whitening.pt, assembled into the model) must be the trainer's; whitened
    # without shifts, the source sends rows of the inputs it computed once (and their mirror images')
    common = [*SMALL, "--layers", "48,32,32", "--epochs", "2", "--negatives", "random", "--seed", "3", *inputs]
    said = _cli("run", *common, "--out", tmp_path / "pipe").output
    said += _cli("run", "--inprocess", *common, "--out", tmp_path / "inproc").output
    said += "".join(capfd.readouterr())  # what the role processes wrote
    # --quiet: in both modes, no header, fit, closing or accuracy line (warnings, such as a silent peer, may remain)
    for line in ("ffpipe: pipeline", "ZCA whitening fitted", "applied", "sent", "test accuracy"):
        assert line not in said, said
    pipe, inproc = (checkpoint.load(tmp_path / d)["model"] for d in ("pipe", "inproc"))
    assert pipe.keys() == inproc.keys()
    for key in pipe:
        assert_close(pipe[key], inproc[key], msg=key)
    s, r = _summary(tmp_path / "pipe"), _summary(tmp_path / "inproc")
    assert s["mode"] == "pipeline" and r["mode"] == "inprocess"
    assert s["test_accuracy"] == pytest.approx(r["test_accuracy"])


@pytest.mark.parametrize("flip", [False, True])
def test_a_whitened_source_computes_the_training_inputs_once_and_sends_what_it_computed_per_batch(tmp_path, monkeypatch, flip):
    from ffpipe import config, data, source
    from ffpipe.topology import Topology

    cfg = config.preset("quick", layers=(16, 16), epochs=2, batch_size=50, negatives="random", standardize=True,
                        whiten=0.1, flip=flip, out=str(tmp_path))
    digits = data.load("digits", "")
    once = source.Source(cfg, digits, Topology.local(2), quiet=True)
    monkeypatch.setattr(source, "PREPARED_MAX_BYTES", 0)  # too little room: each batch whitened as it is sent
    each = source.Source(cfg, digits, Topology.local(2), quiet=True)
    assert once.prepared is not None and (once.prepared[1] is not None) == flip and each.prepared is None
    mirrored = 0
    for a, b in zip(once.stream(), each.stream(), strict=True):
        ma, mb = once.message(a), each.message(b)
        assert (ma.kind, ma.seq, ma.scalars) == (mb.kind, mb.seq, mb.scalars) and ma.tensors.keys() == mb.tensors.keys()
        for key in ma.tensors:
            assert_close(ma.tensors[key], mb.tensors[key], msg=key)
        mirrored += int(a.mirror.sum()) if a.mirror is not None else 0
    assert (mirrored > 0) == flip  # the mirrored rows were compared too


@pytest.mark.parametrize("flags", [
    # the readout's features (flattened image activity) reach the sink at the right width
    ["--layers", "conv4k3,lc4k3s2,16", "--negatives", "random", "--predict", "readout", "--no-skip-first"],
    # competitive loss: no overlay, no negatives, one evaluation pass scores every label
    ["--layers", "conv10k3,lc10k3s2,20", "--loss", "competitive", "--optimizer", "adam", "--lr", "0.003"],
    # competitive with the readout predicting: the features are each stage's own outputs, no second pass
    ["--layers", "conv10k3,lc10k3s2,20", "--loss", "competitive", "--optimizer", "adam", "--lr", "0.003",
     "--predict", "readout", "--readout-optimizer", "adam", "--readout-lr", "0.01", "--eval-every", "1"],
], ids=["overlay", "competitive", "competitive-readout"])
def test_image_layers_run_as_pipeline_stages_with_the_same_updates(tmp_path, flags):
    # conv and locally connected stages size themselves from the input shape the source sends
    common = [*SMALL, *flags, "--epochs", "1", "--seed", "5", "--shift", "1"]
    _cli("run", *common, "--out", tmp_path / "pipe")
    _cli("run", "--inprocess", *common, "--out", tmp_path / "inproc")
    pipe, inproc = (checkpoint.load(tmp_path / d)["model"] for d in ("pipe", "inproc"))
    assert pipe.keys() == inproc.keys() and "layers.1.filters" in pipe
    assert ("layers.0.label" in pipe) == ("competitive" not in flags)  # competitive nets overlay no label
    for key in pipe:
        assert_close(pipe[key], inproc[key], msg=key)
    s, r = _summary(tmp_path / "pipe"), _summary(tmp_path / "inproc")
    assert s["test_accuracy"] == pytest.approx(r["test_accuracy"])
    assert all(("goodness_accuracy" in h) == ("--readout-lr" in flags) for h in s["history"] + r["history"])
    if "--readout-lr" in flags:
        assert pipe["readout.weight"].abs().sum() > 0  # trained, not the zeros it starts from
        for a, b in zip(s["history"], r["history"], strict=True):  # both report the class goodness beside the readout
            assert a["goodness_accuracy"] == pytest.approx(b["goodness_accuracy"]) and a["accuracy"] == pytest.approx(b["accuracy"])


def test_every_batch_is_accounted_for_and_run_files_are_written(tmp_path):
    out = tmp_path / "run"
    _cli("run", *SMALL, "--layers", "32,32", "--epochs", "3", "--eval-every", "1", "--out", out)  # hard negatives, readout
    s = _summary(out)
    a = s["accounting"]
    batches = 3 * 29  # 1,437 images in batches of 50
    assert a["sent_train"] == a["received_train"] == batches and a["applied"] == [batches, batches]
    assert a["sent_eval"] == a["received_eval"] == 3 * 2  # 360 test images in batches of 250, every epoch
    assert a["complete"] and a["rejected"] == {"source": 0, "layer0": 0, "layer1": 0, "sink": 0}
    assert [h["epoch"] for h in s["history"]] == [1, 2, 3] and all(h["samples"] == 360 for h in s["history"])
    assert 0 <= s["test_accuracy"] <= 1 and s["train_samples_per_s"] > 0
    assert set(s["peak_rss_mb"]) == {"source", "layer0", "layer1", "sink"} and all(v > 0 for v in s["peak_rss_mb"].values())
    assert s["peak_gpu_mb"] == {"layer0": None, "layer1": None}  # CPU layers: no GPU memory to report
    run = json.loads((out / "run.json").read_text())
    roles = sorted((p["role"], p["index"]) for p in run["processes"])
    assert roles == [("layer", 0), ("layer", 1), ("sink", None), ("source", None)]
    assert all(p["endpoint"] is None or p["endpoint"].startswith("127.0.0.1:") for p in run["processes"])
    # the assembled checkpoint evaluates to the accuracy the sink measured
    result = runner.invoke(app, ["eval", "--checkpoint", str(out)])
    assert json.loads(result.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(s["test_accuracy"])
    for i in range(2):
        assert checkpoint.load(out / f"layer{i}.pt")["applied"] == batches


def test_layer_memory_is_flat_in_the_number_of_batches(tmp_path):
    peaks = {}
    for epochs in (2, 12):
        out = tmp_path / f"e{epochs}"
        _cli("run", *SMALL, "--layers", "512,512", "--epochs", str(epochs), "--eval-every", "0", "--negatives", "random", "--out", out)
        s = _summary(out)
        assert s["accounting"]["applied"] == [epochs * 29] * 2
        peaks[epochs] = s["peak_rss_mb"]
    # six times the batches; one leaked (50, 512) float32 output pair per batch would add ~70 MB
    for role in ("layer0", "layer1"):
        assert peaks[12][role] < peaks[2][role] + 20, peaks


def _start(tmp_path, *extra):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ffpipe", "run", *SMALL, "--layers", "32,32", "--epochs", "500", "--eval-every", "1",
           "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, out


def _wait_until(proc, predicate, timeout=60.0):
    """Poll a condition while the launcher runs; proc.wait doubles as the poll interval."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        try:
            proc.wait(timeout=0.2)
            pytest.fail(f"launcher exited early with {proc.returncode}: {proc.stdout.read()}")
        except subprocess.TimeoutExpired:
            pass
    pytest.fail("condition not reached in time")


def _training(out):
    def started():
        m = out / "metrics.jsonl"
        return (out / "run.json").is_file() and m.is_file() and '"eval"' in m.read_text()
    return started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split()[2] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_every_process_within_ten_seconds_with_checkpoints(tmp_path, sig):
    proc, out = _start(tmp_path)
    _wait_until(proc, _training(out))
    pids = [p["pid"] for p in json.loads((out / "run.json").read_text())["processes"]]
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C (SIGINT) or `timeout` (SIGTERM) does: the whole process group
    output, _ = proc.communicate(timeout=15)
    assert time.monotonic() - t0 < 10, output
    assert proc.returncode == 1 and "stopped on request" in output
    assert not any(_alive(p) for p in pids)
    for i in range(2):
        layer = checkpoint.load(out / f"layer{i}.pt")
        assert layer["applied"] > 0 and torch.isfinite(layer["layer"]["linear.weight"]).all()
    s = _summary(out)
    assert s["interrupted"] and s["accounting"]["complete"]  # what was sent before the stop all arrived
    net, _ = load_model(out)  # the stopped run's layers, assembled for ffpipe eval
    stopped = checkpoint.load(out / "layer0.pt")["layer"]["linear.weight"]
    assert torch.equal(net.state_dict()["layers.0.linear.weight"], stopped)


@pytest.mark.slow
def test_no_role_outlives_a_launcher_killed_with_sigkill(tmp_path):
    """Its death sends each role SIGTERM (PR_SET_PDEATHSIG). The source's orderly stop once went on trying to reach
    layers that were gone for the peer timeout (120 s); an orphaned role now ends within 5 s of it, checkpoint kept."""
    proc, out = _start(tmp_path)
    _wait_until(proc, _training(out))
    pids = [p["pid"] for p in json.loads((out / "run.json").read_text())["processes"]]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling other processes' exits: nothing to synchronize with
    assert not any(_alive(p) for p in pids)
    checkpoint.load(out / "layer0.pt")  # what it held is intact


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["layer", "source", "sink"])
def test_a_dead_child_stops_the_rest_and_is_named(tmp_path, victim):
    proc, out = _start(tmp_path)
    _wait_until(proc, _training(out))
    processes = json.loads((out / "run.json").read_text())["processes"]
    target = next(p for p in processes if p["role"] == victim and p["index"] in (None, 1))
    t0 = time.monotonic()
    os.kill(target["pid"], signal.SIGKILL)
    output, _ = proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 10, output
    name = victim if victim != "layer" else "layer 1"
    assert proc.returncode == 1
    assert f"error: {name} (pid {target['pid']}) died: killed by SIGKILL" in output
    assert not any(_alive(p["pid"]) for p in processes)


def test_a_stop_whose_sigterm_kills_the_source_before_its_handler_stops_every_other_role(tmp_path):
    """On a busy machine a Ctrl-C can come while the source is still importing torch: the launcher's SIGTERM then
    kills it before it can send the in-band stop. The launcher counts that as stopped, not dead, and sends each
    other role SIGTERM itself (a layer saves its checkpoint and exits 143); the run ends as stopped, at once."""
    from ffpipe import data as datasets
    from ffpipe.launcher import STOPPED_ALONE, Child, Launcher

    cfg = config_for_launcher(tmp_path)
    launcher = Launcher(cfg, datasets.load("digits", "data"), ["cpu", "cpu"], 1)
    traps = f"import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit({STOPPED_ALONE})); print(1, flush=True); signal.pause()"
    def child(role, index, code):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        return Child(role, index, "cpu", proc)
    launcher.children = [child("sink", None, traps), child("layer", 1, traps), child("layer", 0, traps),
                         child("source", None, "import signal; print(1, flush=True); signal.pause()")]  # no handler
    try:
        for c in launcher.children:
            assert c.proc.stdout.readline() == "1\n"  # running, and the trap is set where there is one
        launcher.stop_requested_at = time.monotonic()
        launcher.children[-1].proc.send_signal(signal.SIGTERM)  # what _on_signal does
        assert launcher._watch() is True  # stopped on request, not "source died: killed by SIGTERM"
        assert [c.proc.returncode for c in launcher.children] == [STOPPED_ALONE] * 3 + [-signal.SIGTERM]
    finally:
        for c in launcher.children:
            c.proc.kill()
            c.proc.wait()


def config_for_launcher(tmp_path):
    from ffpipe import config

    return config.preset("quick", dataset="digits", layers=(8, 8), epochs=1, out=str(tmp_path))


def test_role_flags_are_checked(tmp_path):
    for args, message in ((["--role", "layer"], "--index"), (["--role", "router"], "--role must be"),
                          (["--role", "sink", "--layer-addrs", "127.0.0.1:1"], "1 addresses for 2 layers"),
                          (["--role", "source", "--sink-addr", "nohost"], "host:port"),
                          (["--devices", "cpu,cpu,cpu"], "3 devices for 2 layers")):
        result = runner.invoke(app, ["run", "--dataset", "digits", "--layers", "8,8", "--out", str(tmp_path), *args])
        assert result.exit_code == 1 and message in result.output, result.output


@pytest.mark.parametrize("flags, message", [
    (["--layers", "64,600000"], "layer 1 would forward evaluation messages of 2,500 x 600,000 floats (5,722 MB a tensor)"),
    (["--dataset", "synthetic", "--layers", "64,40000", "--batch-size", "4000"],
     "layer 1 would forward train messages of 4,000 x 40,000 floats (610 MB a tensor)"),
])
def test_a_run_whose_messages_would_exceed_the_wires_caps_is_refused_before_it_starts(tmp_path, flags, message):
    """Each layer would apply its batch and then fail to send it on: refused in one line, no process started."""
    result = runner.invoke(app, ["run", "--dataset", "digits", *flags, "--epochs", "1", "--out", str(tmp_path)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "run.json").exists()


@pytest.mark.slow
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path):
    args = ["--layers", "64,64", "--epochs", "40", "--negatives", "random"]
    proc, out = _start(tmp_path, *args)
    _wait_until(proc, _training(out))
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=15)
    stopped = checkpoint.load(out / "layer0.pt")["applied"]
    assert 0 < stopped < 40 * 29
    _cli("run", "--resume", out, "--quiet")
    s = _summary(out)
    assert s["accounting"]["complete"] and s["accounting"]["applied"] == [40 * 29] * 2
    assert s["accounting"]["sent_train"] == 40 * 29 and s["accounting"]["received_train"] == 40 * 29
    assert s["accounting"]["sent_train_now"] == 40 * 29 - stopped  # nothing applied twice, nothing skipped
    again = runner.invoke(app, ["run", "--resume", str(out), "--quiet"])  # finished: refused at once, not restarted
    assert again.exit_code == 1 and "finished all 40 epochs" in again.output and "nothing to resume" in again.output
    _cli("run", *SMALL, *args, "--eval-every", "1", "--out", tmp_path / "straight")
    resumed, straight = checkpoint.load(out)["model"], checkpoint.load(tmp_path / "straight")["model"]
    for key in straight:
        assert_close(resumed[key], straight[key], msg=key)


def test_pin_plan_gives_each_layer_its_own_core_while_cores_last(monkeypatch):
    from ffpipe import launcher

    monkeypatch.setattr(launcher.os, "sched_getaffinity", lambda pid: {2, 5})
    assert launcher.pin_plan([1, 1]) == {"layer0": {2}, "layer1": {5}, "source": {2}, "sink": {2}}  # a tie: the first
    plan = launcher.pin_plan([1, 1, 1, 1])
    assert [plan[f"layer{i}"] for i in range(4)] == [{2}, {5}, {2}, {5}] and plan["sink"] == {2}


def test_a_pinned_pipeline_runs_each_layer_on_its_core(tmp_path, monkeypatch):
    from ffpipe import launcher

    out = tmp_path / "run"
    seen = {}
    original = launcher.Launcher._spawn

    def spawn(self, role, index, device, flags):  # each child's affinity right after the launcher pinned it
        child = original(self, role, index, device, flags)
        seen[(role, index)] = os.sched_getaffinity(child.proc.pid)
        return child

    monkeypatch.setattr(launcher.Launcher, "_spawn", spawn)
    _cli("run", *SMALL, "--layers", "16,16", "--epochs", "1", "--pin", "--out", out)
    cores = sorted(os.sched_getaffinity(0))
    assert seen[("layer", 0)] == {cores[0]} and seen[("layer", 1)] == {cores[1 % len(cores)]}
    # layer 1 (16 x 16 multiply-adds per image) costs less than layer 0 (64 x 16): the source and sink share its core
    assert seen[("source", None)] == seen[("sink", None)] == {cores[1 % len(cores)]}
    assert _summary(out)["accounting"]["complete"]


def test_a_run_tuned_on_a_hold_out_meets_the_test_set_once_at_the_end(tmp_path):
    _cli("run", *SMALL, "--layers", "32,32", "--epochs", "1", "--val-size", "200", "--out", tmp_path)
    s = _summary(tmp_path)
    assert [h["split"] for h in s["history"]] == ["val"] and s["val_accuracy"] == s["history"][-1]["accuracy"]
    line = json.loads(_cli("eval", "--checkpoint", tmp_path).stdout.strip().splitlines()[-1])
    assert line["split"] == "test" and s["test_accuracy"] == pytest.approx(line["accuracy"])


def test_pinning_gives_the_source_and_sink_the_core_whose_layers_cost_least():
    from ffpipe.launcher import pin_plan
    from ffpipe.layer import LayerSpec, plan

    costs = [spec.macs(shape) for spec, shape, _ in plan((1000, 1000), (1, 28, 28))]
    assert costs == [784 * 1000, 1000 * 1000]
    assert LayerSpec.parse("conv8k3").macs((3, 32, 32)) == 8 * 32 * 32 * 9 * 3
    p = pin_plan(costs, cores=[4, 7])
    assert p == {"layer0": {4}, "layer1": {7}, "source": {4}, "sink": {4}}  # layer 1 has its core to itself
    p = pin_plan([5, 1, 1, 1], cores=[0, 1])  # layers 0, 2 on core 0 (6), layers 1, 3 on core 1 (2)
    assert p["layer2"] == {0} and p["layer3"] == {1} and p["source"] == p["sink"] == {1}
    assert pin_plan([3, 1], cores=[0, 1, 2, 3])["sink"] == {1}  # a core without a layer is not chosen
