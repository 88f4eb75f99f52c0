"""`ffpipe bench`: every variant on tiny synthetic runs (records, plots, cleanup), failures reported, not dropped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ffpipe.bench import BenchOptions, derive
from ffpipe.cli import app
from ffpipe.metrics import PeakMemory
from ffpipe.sink import steady_rate

runner = CliRunner()
TINY = ["--synthetic", "--layers", "32,32", "--batch-size", "16", "--steps", "10", "--timeout", "120"]
PNG = b"\x89PNG\r\n\x1a\n"


def _bench(*args):
    return runner.invoke(app, ["bench", *map(str, args)])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _started_pids(out: Path) -> list[int]:
    """Every process a pipeline run started, from its run.json."""
    pids = []
    for run in out.glob("runs/*/run/run.json"):
        meta = json.loads(run.read_text())
        pids += [meta["launcher_pid"], *(p["pid"] for p in meta["processes"])]
    return pids


def _valid_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and b"IHDR" in data[:32] and data.rstrip().endswith(b"IEND\xaeB`\x82") and len(data) > 2000


@pytest.mark.slow
def test_every_variant_gives_a_plausible_record_and_plots(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "accuracy.png").write_bytes(PNG)  # an earlier bench's, with --to-accuracy: this one draws none
    result = _bench(*TINY, "--in-flight", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert not (out / "accuracy.png").exists()
    bench = json.loads((out / "bench.json").read_text())
    records = bench["records"]
    throughput = {r["variant"]: r for r in records if r["kind"] == "throughput"}
    assert set(throughput) == {"ff-inprocess", "ff-pipeline", "bp-inprocess", "bp-gpipe", "bp-1f1b"}
    for name, r in throughput.items():
        assert r["ok"], (name, r["error"])
        assert r["stages"] == 2 and r["config"]["layers"] == [32, 32] and r["config"]["threads"] == 1
        assert 0 < r["samples_per_s"] < 1e7, name
        assert 100 < r["peak_rss_mb_max"] <= r["peak_rss_mb_total"], name
        assert r["growth_mb_max"] is not None and r["growth_mb_max"] >= 0, name
        assert all(0 < b < 1.5 for b in r["busy"].values()), (name, r["busy"])
    assert len(throughput["ff-pipeline"]["processes"]) == 4  # source, two layers, sink
    assert throughput["ff-pipeline"]["accounting_complete"]
    assert set(throughput["bp-gpipe"]["processes"]) == {"stage0", "stage1"} and throughput["bp-gpipe"]["microbatches"] == 4
    assert throughput["ff-inprocess"]["vs_ff_inprocess"] == 1.0 and throughput["bp-inprocess"]["vs_bp_inprocess"] == 1.0
    assert throughput["ff-pipeline"]["pipeline_efficiency"] > 0
    # each layer's local update per batch, timed in both FF variants: the stage-time breakdown pairs them
    assert len(throughput["ff-inprocess"]["processes"]["main"]["update_ms"]) == 2
    stages = throughput["ff-pipeline"]["stage_times"]
    assert [s["layer"] for s in stages] == [0, 1]
    for s in stages:
        assert 0 < s["pipeline_cpu_ms"] and 0 < s["pipeline_ms"] < s["batch_ms"] * 1.05 and 0 < s["inprocess_ms"], s
        assert s["slowdown"] == round(s["pipeline_ms"] / s["inprocess_ms"], 3) and 0 < s["share_of_batch"] <= 1.05, s
    ceiling = [r for r in records if r["kind"] == "ceiling"]
    if (os.cpu_count() or 1) >= 2:  # two copies of ff-inprocess at once, each timed after the other's warm-up
        (c,) = ceiling
        assert c["ok"] and c["config"]["copies"] == 2 and len(c["samples_per_s_each"]) == 2, c
        assert all(0 < x < 1e7 for x in c["samples_per_s_each"]) and set(c["processes"]) == {"copy0", "copy1"}
        assert 0 < c["ceiling"] and throughput["ff-pipeline"]["parallel_ceiling"] == c["ceiling"]
        assert "The machine's parallel ceiling" in (out / "bench.md").read_text()
    else:
        assert ceiling == []
    (wire,) = [r for r in records if r["kind"] == "wire"]
    assert wire["ok"] and wire["wire_ms"] > 0 and wire["compute_ms"] > 0 and wire["message_mb"] == round(2 * 16 * 32 * 4 / 2**20, 2)
    memory = [r for r in records if r["kind"] == "memory"]
    assert sorted((r["variant"], r["config"]["hwm"], r["config"]["microbatches"], r["config"]["steps"]) for r in memory) == [
        ("bp-gpipe", 2, 1, 10), ("ff-pipeline", 1, 4, 10), ("ff-pipeline", 2, 4, 40)]  # bp-gpipe: m=1, 10 // 1 steps
    assert bench["machine"]["cores"] >= 1 and bench["options"]["batch_size"] == 16
    md = (out / "bench.md").read_text()
    assert "| ff-pipeline | 2 | 2 |" in md and "Memory against batches in flight" in md and "The wire's share" in md
    assert "Where a pipeline stage's time goes" in md
    for png in ("throughput.png", "memory.png"):
        assert _valid_png(out / png), png
    assert not any(_alive(pid) for pid in _started_pids(out))
    # the runs' trained weights are gone (the service wrote them: every layer's and the assembled model), their figures kept
    assert list(out.glob("runs/throughput-ff-pipeline-*/run/summary.json")) and not list(out.rglob("*.pt"))


@pytest.mark.slow
def test_time_to_accuracy_and_its_plot(tmp_path):
    out = tmp_path / "bench"
    result = _bench("--dataset", "digits", "--layers", "64,64", "--batch-size", "50", "--steps", "4",
                    "--variants", "ff-inprocess,bp-inprocess", "--to-accuracy", "0.2", "--max-epochs", "8", "--keep-checkpoints", "--out", out)
    assert result.exit_code == 0, result.output
    acc = [r for r in json.loads((out / "bench.json").read_text())["records"] if r["kind"] == "accuracy"]
    assert [r["variant"] for r in acc] == ["ff-inprocess", "bp-inprocess"]
    for r in acc:
        assert r["ok"] and r["history"] and 0 < r["time_to_accuracy_s"]["0.2"] <= r["history"][-1]["wall_s"]
    assert "Wall time to test accuracy" in (out / "bench.md").read_text()
    assert _valid_png(out / "accuracy.png")
    assert list(out.glob("runs/accuracy-ff-inprocess-*/checkpoint.pt"))  # --keep-checkpoints: the trained model stays


@pytest.mark.slow
def test_a_run_past_its_timeout_is_killed_with_everything_it_started_and_reported(tmp_path):
    out = tmp_path / "bench"
    result = _bench("--synthetic", "--layers", "256,256", "--batch-size", "64", "--steps", "100000", "--variants", "ff-pipeline",
                    "--timeout", "12", "--out", out)
    assert result.exit_code == 2, result.output
    r, wire = json.loads((out / "bench.json").read_text())["records"]
    assert not r["ok"] and "timed out after 12s" in r["error"] and r["kind"] == "throughput"
    assert wire["ok"] and wire["kind"] == "wire"  # one failed run does not stop the rest
    assert "failed: timed out" in (out / "bench.md").read_text()
    pids = _started_pids(out)
    assert len(pids) == 5 and not any(_alive(pid) for pid in pids)


def test_killing_a_run_reaches_the_processes_it_started_in_sessions_of_their_own(tmp_path):
    """What a launcher does: its children live in new sessions, out of reach of a signal to its process group.
    One of them shrugs off SIGTERM; _kill_group must still leave nothing running when it returns."""
    from ffpipe.bench import _kill_group

    # the grandchild says its pid on the pipe they share once it ignores SIGTERM; both then wait to be killed
    grandchild = "import os, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(os.getpid(), flush=True); signal.pause()"
    child = f"import signal, subprocess, sys; subprocess.Popen([sys.executable, '-c', {grandchild!r}], start_new_session=True); signal.pause()"
    proc = subprocess.Popen([sys.executable, "-c", child], start_new_session=True, stdout=subprocess.PIPE, text=True)
    stubborn = int(proc.stdout.readline())
    try:
        assert _alive(stubborn)
        _kill_group(proc)
        assert proc.returncode is not None and not _alive(stubborn)
    finally:
        proc.stdout.close()
        for pid in (proc.pid, stubborn):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_bad_options_fail_with_one_line(tmp_path):
    for args, message in (
        (["--variants", "ff-inprocess,nonsense"], "--variants must be"),
        (["--steps", "2"], "--steps must be >= 3"),
        (["--devices", "cuda:1"], "--devices must be cpu or cuda"),
        (["--seed", str(2**63)], "--seed must be in [0, 2**63)"),
        (["--batch-size", "2000000"], "--batch-size must be at most 1,048,576"),
        (["--dataset", "digits", "-m", "8"], "bp-gpipe: a step of -m 8 x --batch-size 256 = 2,048 images exceeds the 1,437"),
        (["--dataset", "digits", "--variants", "bp-gpipe", "--in-flight", "16"], "a step of --in-flight 16"),
        (["--to-accuracy", "98"], "accuracies in (0, 1]"),
        (["--devices", "tpu"], "--devices must be cpu or cuda"),
        (["--layers", "conv8k3,64"], "give widths"),
        (["--dataset", "mnist", "--data-dir", tmp_path / "nowhere"], str(tmp_path / "nowhere")),
    ):
        result = _bench(*args, "--out", tmp_path / "b")
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output.replace("\n", ""), (args, result.output)
    assert not (tmp_path / "b").exists()  # nothing started
    (tmp_path / "file").write_text("")
    result = _bench("--synthetic", "--out", tmp_path / "file" / "b")  # a file where a folder must be made
    assert result.exit_code == 1 and result.output.strip() == f"error: {tmp_path / 'file' / 'b'}: Not a directory", result.output


def test_steady_rate_leaves_out_the_warm_up():
    arrivals = [(0.0, 10)] + [(10.0 + i, 100) for i in range(10)]  # a slow first batch, then 100 images/s
    assert steady_rate(arrivals) == pytest.approx(100.0)
    assert steady_rate(arrivals[:2]) is None


def test_ratios_and_efficiency():
    def rec(variant, sps, device="cpu"):
        return {"variant": variant, "kind": "throughput", "stages": 2, "ok": True, "samples_per_s": sps, "config": {"device": device}}

    records = [rec("ff-inprocess", 1000), rec("ff-pipeline", 1800), rec("bp-inprocess", 4000), rec("bp-gpipe", 2000)]
    derive(records, cores=2)
    ff1, pipe, bp, gpipe = records
    assert pipe["pipeline_efficiency"] == 0.9 and pipe["vs_ff_inprocess"] == 1.8 and pipe["vs_bp_inprocess"] == 0.45
    assert pipe["vs_ideal_l_over_2_bp"] == 0.45 and gpipe["vs_bp_inprocess"] == 0.5 and "pipeline_efficiency" not in gpipe
    # two independent copies at once get 800 and 700 against 1000 alone: the machine's ceiling is 0.75
    ceiling = {"kind": "ceiling", "variant": "ff-inprocess", "stages": 2, "ok": True, "samples_per_s_each": [800, 700],
               "config": {"device": "cpu", "copies": 2}}
    records.append(ceiling)
    derive(records, cores=2)
    assert ceiling["ceiling"] == 0.75 and pipe["parallel_ceiling"] == 0.75 and pipe["efficiency_of_ceiling"] == 1.2
    assert "stage_times" not in pipe  # no layer reported its update time (as on a GPU)
    # layers that update in 40 and 50 ms in the pipeline, 20 and 25 ms one after another in one process;
    # 1,000 images/s at batch 50 is 50 ms per batch: layer 1 never waits, layer 0 waits a fifth of the time
    ff1["processes"] = {"main": {"update_ms": [20.0, 25.0]}}
    pipe.update(samples_per_s=1000, config={"device": "cpu", "batch_size": 50},
                processes={"layer0": {"update_ms": 40.0, "update_cpu_ms": 38.0}, "layer1": {"update_ms": 50.0, "update_cpu_ms": 45.0}})
    derive(records, cores=2)
    assert pipe["stage_times"] == [
        {"layer": 0, "pipeline_ms": 40.0, "pipeline_cpu_ms": 38.0, "batch_ms": 50.0, "share_of_batch": 0.8, "inprocess_ms": 20.0, "slowdown": 2.0},
        {"layer": 1, "pipeline_ms": 50.0, "pipeline_cpu_ms": 45.0, "batch_ms": 50.0, "share_of_batch": 1.0, "inprocess_ms": 25.0, "slowdown": 2.0}]
    with pytest.raises(ValueError):
        BenchOptions(steps=1)
    with pytest.raises(ValueError, match="a benchmark names its data"):
        BenchOptions(dataset="auto")


def test_peak_memory_separates_training_from_startup():
    blob = bytearray(64 << 20)  # a startup spike, freed before training
    del blob
    memory = PeakMemory()
    memory.training_starts()
    kept = bytearray(32 << 20)
    kept[:: 4096] = b"x" * len(kept[:: 4096])  # touch every page
    report = memory.report()
    assert report["peak_rss_mb"] >= report["train_peak_rss_mb"] >= report["rss_start_mb"]
    if Path("/proc/self/clear_refs").exists():
        assert 24 < report["train_peak_rss_mb"] - report["rss_start_mb"] < 48
    del kept


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_bench_that_is_stopped_or_killed_leaves_no_process_behind(tmp_path, sig):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "ffpipe", "bench", "--synthetic", "--layers", "256,256", "--batch-size", "64",
           "--steps", "100000", "--variants", "ff-pipeline", "--out", str(out)]
    bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _started_pids(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = _started_pids(out)
        assert len(pids) == 5, "the pipeline did not start"
        while sig == signal.SIGTERM and not list(out.rglob("*.pt")) and time.monotonic() < deadline:
            time.sleep(0.2)  # until the layers have saved a checkpoint, which the stopped bench must delete
        variant = _children(bench.pid)  # the benchrun process of the running variant
        bench.send_signal(sig)
        bench.wait(30)
        deadline = time.monotonic() + 20  # the launcher drains for up to 10 s, then kills
        while any(_alive(p) for p in pids + variant) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids + variant)
        if sig == signal.SIGTERM:  # stopped, not killed: what it measured (nothing yet) is written, and says so
            result = json.loads((out / "bench.json").read_text())
            assert result["stopped_after"] == "0 of 2 runs" and result["records"] == []
            assert "Stopped early" in (out / "bench.md").read_text()
            assert not list(out.rglob("*.pt"))  # the stopped run's checkpoints went too
    finally:
        if bench.poll() is None:
            bench.kill()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_every_planned_run_times_some_steps_after_its_warm_up():
    from ffpipe.bench import plan

    options = BenchOptions(steps=200, stages=(1, 4), in_flight=(1, 4, 16), to_accuracy=(0.9,))
    specs = plan(options, cores=2)
    assert len(specs) == 5 * 3 + 2 + 1 + 7 + 5  # two ceiling runs: 2 copies at 2 and at 4 stages on 2 cores
    assert [(len(s["layers"]), s["copies"]) for s in specs if s["kind"] == "ceiling"] == [(2, 2), (4, 2)]
    assert [len(s["layers"]) for s in plan(options, cores=8) if s["kind"] == "ceiling"] == [2, 4]
    assert not any(s["kind"] == "ceiling" for s in plan(options, cores=1))  # one busy process: nothing to share
    for s in specs:
        assert 1 <= s["warmup"] < s["steps"], s
    gpipe = {s["microbatches"]: s["steps"] for s in specs if s["kind"] == "memory" and s["variant"] == "bp-gpipe"}
    assert gpipe == {1: 200, 4: 50, 16: 12}  # about the same images per run at every m


def test_repeats_interleave_rounds_and_pair_ratios_within_each_round(tmp_path):
    from ffpipe.bench import aggregate, plan, write_markdown

    options = BenchOptions(variants=("ff-inprocess", "ff-pipeline"), stages=(2,), repeats=3, out=str(tmp_path))
    specs = plan(options, cores=2)
    timed = [(s["kind"], s["variant"], s["round"]) for s in specs if s["kind"] in ("throughput", "ceiling")]
    one_round = [("throughput", "ff-inprocess"), ("throughput", "ff-pipeline"), ("ceiling", "ff-inprocess")]
    assert timed == ([(*k, 1) for k in one_round] + [(*k, 2) for k in reversed(one_round)] + [(*k, 3) for k in one_round])
    assert [s["kind"] for s in specs].count("wire") == 1  # the wire and memory runs are not repeated
    assert len({s["work"] for s in specs}) == len(specs)  # every run keeps its own folder

    def rec(variant, rnd, sps=None, each=None):
        kind = "ceiling" if each else "throughput"
        r = {"variant": variant, "kind": kind, "stages": 2, "round": rnd, "ok": True, "config": {"device": "cpu", "copies": 2, "hwm": 2}}
        return {**r, "samples_per_s_each": each} if each else {**r, "samples_per_s": sps}

    # the machine is twice as fast in round 2: paired within rounds, the efficiency is 0.8, 0.9 and 0.7
    records = [rec("ff-inprocess", 1, 1000), rec("ff-pipeline", 1, 1600), rec("ff-inprocess", 1, each=[900, 900]),
               rec("ff-inprocess", 2, 2000), rec("ff-pipeline", 2, 3600), rec("ff-inprocess", 2, each=[1900, 1900]),
               rec("ff-inprocess", 3, 1000), rec("ff-pipeline", 3, 1400), rec("ff-inprocess", 3, each=[1000, 1000])]
    derive(records, cores=2)
    assert [r["pipeline_efficiency"] for r in records if r["variant"] == "ff-pipeline"] == [0.8, 0.9, 0.7]
    assert [r["ceiling"] for r in records if r["kind"] == "ceiling"] == [0.9, 0.95, 1.0]
    rows = {(r["kind"], r["variant"]): r for r in aggregate(records)}
    pipe = rows[("throughput", "ff-pipeline")]
    assert pipe["rounds"] == 3 and pipe["pipeline_efficiency"] == {"median": 0.8, "min": 0.7, "max": 0.9}
    assert pipe["samples_per_s"] == {"median": 1600, "min": 1400, "max": 3600}
    assert rows[("ceiling", "ff-inprocess")]["ceiling"]["median"] == 0.95
    info = {"cpu": "test", "cores": 2, "torch": "-", "python": "-"}
    write_markdown(tmp_path / "bench.md", records, options, info, "ffpipe bench --repeats 3")
    text = (tmp_path / "bench.md").read_text()
    assert "## Over the rounds" in text and "| ff-pipeline | 2 | 3 | 1,600 (1,400-3,600) |" in text
    assert "0.80 (0.70-0.90)" in text
    with pytest.raises(ValueError):
        BenchOptions(repeats=0)
