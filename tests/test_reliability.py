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


def _signal_mid_run(tmp_path, role, index, sig, after):
    """A run with --restart on-failure; `sig` to one role once layer 1 holds batch `after`; the run must finish."""
    out = tmp_path / "run"
    proc = _launch(out, "--restart", "on-failure")
    _wait_until(proc, lambda: (out / "run.json").is_file() and (out / "layer1.pt").is_file()
                and checkpoint.load(out / "layer1.pt")["last_batch"] >= after)
    victim = _pid(out, role, index)
    os.kill(victim, sig)
    output, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, output
    return out, output, role if index is None else f"{role} {index}", victim


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("role,index", [("layer", 0), ("layer", 1), ("source", None), ("sink", None)])
def test_kill_9_with_restart_applies_every_batch_exactly_once(tmp_path, reference, role, index):
    target = random.Random(f"{role}{index}").randrange(10, 60)  # a random point of the run, in batches
    out, output, name, victim = _signal_mid_run(tmp_path, role, index, signal.SIGKILL, target)
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
@pytest.mark.timeout(180)
@pytest.mark.parametrize("role,index", [("layer", 1), ("sink", None)])
def test_a_sigterm_to_one_layer_or_the_sink_alone_is_a_failure_the_launcher_restarts(tmp_path, role, index):
    """Such a role saves its checkpoint and leaves; the run cannot finish without it, so it must not exit 0
    (the launcher, like a container runtime, restarts only what failed): it exits 128 + SIGTERM."""
    out, output, name, victim = _signal_mid_run(tmp_path, role, index, signal.SIGTERM, 20)
    assert f"{name} (pid {victim}) died: stopped by a SIGTERM of its own before the run's end; restarting it" in output
    s = _summary(out)
    a = s["accounting"]
    assert s["restarts"] == {name: 1} and not s["interrupted"] and a["complete"], a
    assert a["applied"] == [BATCHES, BATCHES] and a["applied_twice"] == {"layer0": 0, "layer1": 0}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_sink_stopped_alone_saves_what_it_has_taken(tmp_path):
    out = tmp_path / "run"
    proc = _launch(out)
    _wait_until(proc, lambda: (out / "run.json").is_file() and (out / "sink.pt").is_file()
                and checkpoint.load(out / "sink.pt")["last_batch"] >= 20)
    os.kill(_pid(out, "sink", None), signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "sink (pid" in output and "stopped by a SIGTERM of its own" in output, output
    saved = checkpoint.load(out / "sink.pt")
    assert saved["received"]["train"] == _summary(out)["accounting"]["received_train"] == saved["last_batch"] > 20


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_sigterm_to_the_source_alone_ends_the_run_as_stopped_not_as_a_success(tmp_path):
    """The source takes it as a stop request (it sends every role an interrupted stop); the run is not finished,
    so the launcher must not exit 0, and the run can be resumed."""
    out = tmp_path / "run"
    proc = _launch(out, "--restart", "on-failure")
    _wait_until(proc, lambda: (out / "run.json").is_file() and (out / "layer1.pt").is_file()
                and checkpoint.load(out / "layer1.pt")["last_batch"] >= 20)
    os.kill(_pid(out, "source", None), signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output
    assert f"error: the source was stopped by a signal of its own before the run finished; {out / 'checkpoint.pt'} holds" in output
    assert _summary(out)["interrupted"] is True
    _cli("run", "--resume", out)
    s = _summary(out)
    assert not s["interrupted"] and s["accounting"]["complete"] and s["accounting"]["applied"] == [BATCHES, BATCHES]


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
@pytest.mark.parametrize("flags, dead, message", [
    (["--lr", "1e30"], "layer 0", "error: layer 0 has diverged: its loss on train batch "),
    (["--predict", "readout", "--readout-lr", "1e30"], "sink", "error: the sink's readout has diverged: its loss on train batch "),
])
def test_a_diverging_layer_or_readout_stops_the_run_with_one_line_instead_of_resending_for_ever(tmp_path, flags, dead, message):
    """Its loss is not finite on finite inputs: refusing each batch, as for a batch holding NaN, would have the
    source resend them without end. The role says so and exits; the launcher stops the rest."""
    out = tmp_path / "run"
    proc = _launch(out, *flags)
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 1, output
    assert message in output and "(a lower --" in output
    assert f"error: {dead} (pid " in output and "died: exit code 1; stopped the rest" in output
    assert "Traceback" not in output


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
    result = subprocess.run([sys.executable, "-m", "ffpipe", "run", "--resume", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=100)
    assert result.returncode != 0
    assert f"{out / 'layer0.pt'}: checksum mismatch: the file is corrupt" in result.stdout + result.stderr
    result = subprocess.run([sys.executable, "-m", "ffpipe", "eval", "--checkpoint", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "checksum mismatch" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-layer pipeline run: its checkpoints hold the run's final stop."""
    out = tmp_path_factory.mktemp("finished")
    (out / "sink.pt").write_bytes(b"an older run's state")  # a fresh run clears it instead of continuing from it
    _cli("run", *SMALL, "--layers", "16,16", "--epochs", "2", "--negatives", "random", "--out", out)
    return out


def _config(out):
    from ffpipe.config import RunConfig

    return RunConfig.from_json((out / "config.json").read_text())


def test_a_fresh_run_ignores_an_old_sink_state_and_saves_its_own(finished):
    s = _summary(finished)
    assert s["accounting"]["complete"] and s["accounting"]["received_train"] == 2 * 29
    assert checkpoint.load(finished / "sink.pt")["expected"] == 2 * 29 + 2 * 2  # train batches and eval parts taken


@pytest.mark.timeout(60)
def test_roles_restarted_after_the_final_stop_finish_instead_of_waiting(finished):
    """A layer killed after forwarding the stop, the source after sending it, the sink after taking it."""
    import threading

    import zmq

    from ffpipe import transport
    from ffpipe.sink import Sink
    from ffpipe.source import durable_state
    from ffpipe.topology import Topology
    from ffpipe.worker import Worker

    cfg = _config(finished)
    assert durable_state(finished, 2) == (58, 62, True)  # the source has nothing left to send
    topo = Topology.local(2)
    ctx = zmq.Context()
    downstream = transport.pull(ctx, topo.sink.bind_url("127.0.0.1"))
    worker = Worker(cfg, 1, topo, finished, peer_timeout_s=20, resume=True)
    thread = threading.Thread(target=worker.run)
    thread.start()
    stop = transport.recv(downstream, 20_000)
    thread.join(20)
    downstream.close()
    ctx.term()
    assert not thread.is_alive() and stop.kind == "stop" and stop.scalars["layer1.applied"] == 58
    before = _summary(finished)
    summary = Sink(cfg, Topology.local(2), finished, peer_timeout_s=20, show_progress=False, resume=True).run()
    assert summary["accounting"]["complete"] and summary["history"] == before["history"]


def test_a_sink_state_from_a_run_numbered_differently_is_refused(finished):
    from ffpipe.checkpoint import CheckpointError
    from ffpipe.config import apply
    from ffpipe.sink import Sink
    from ffpipe.topology import Topology

    with pytest.raises(CheckpointError, match="other epochs, eval_every"):
        Sink(apply(_config(finished), epochs=5, eval_every=2), Topology.local(2), finished, resume=True)


@pytest.mark.parametrize("change, named", [({"layer": {"threshold": 3.0}}, "other layer"),
                                            ({"standardize": True}, "other standardize")])
def test_a_layer_resumed_by_a_run_that_changes_what_its_weights_were_made_with_is_refused(finished, change, named):
    """A role run apart (compose, another host) resumes from its own checkpoint with the flags it is given: the
    same weights under another loss threshold or other inputs would go on training silently."""
    from ffpipe.checkpoint import CheckpointError
    from ffpipe.config import apply, override_nested
    from ffpipe.topology import Topology
    from ffpipe.worker import Worker

    cfg = _config(finished)
    cfg = override_nested(cfg, **change) if "layer" in change else apply(cfg, **change)
    with pytest.raises(CheckpointError, match=named):
        Worker(cfg, 1, Topology.local(2), finished, resume=True)
    Worker(_config(finished), 1, Topology.local(2), finished, resume=True)  # the run's own settings resume


def test_a_layer_behind_an_evaluation_reports_a_gap_instead_of_evaluating(finished):
    import torch

    from ffpipe.topology import Topology
    from ffpipe.wire import Message
    from ffpipe.worker import Worker

    worker = Worker(_config(finished), 0, Topology.local(2), finished, resume=True)  # holds batch 58
    x = torch.rand(2 * 10, 64)
    msg = Message("eval", 70, 2, {"round": 2, "batches": 2, "part": 0, "classes": 10, "after": 60},
                  {"x_all": x, "goodness": torch.zeros(2, 10), "y": torch.zeros(2, dtype=torch.long)})
    assert worker.on_eval(msg).kind == "gap" and worker.out_of_order == 1
    msg.scalars["after"] = 58
    scored = worker.on_eval(msg)
    assert scored.kind == "eval" and not any(k.startswith("ahead.") for k in scored.scalars)
    msg.scalars["after"] = 50  # a round resent after a sink restart: this layer has moved on 8 batches since
    assert worker.on_eval(msg).scalars["ahead.0"] == 8


def test_the_sink_marks_a_round_some_layer_scored_with_newer_weights(sink_at_hand):
    """The known limit of a resent evaluation (no layer keeps old weights): its history entry says so."""
    import torch

    from ffpipe.wire import Message

    sink, take, _, _ = sink_at_hand
    y = torch.zeros(4, dtype=torch.long)
    for seq, ahead in enumerate([{}, {"ahead.1": 8}, {}, {}]):
        scalars = {"split": "val", "round": 1 + seq // 2, "batches": 2, "part": seq % 2, "classes": 10, **ahead}
        take(Message("eval", seq, 1, scalars, {"y": y, "goodness": torch.zeros(4, 10)}))
    assert [h.get("weights_ahead_batches") for h in sink.history] == [8, None]


@pytest.fixture
def sink_at_hand(tmp_path):
    """A Sink of a two-layer run (checkpoints every 10 batches) driven by hand: its `_take` and `_duplicate`, with
    its acknowledgements read off a PULL where the source would be. Yields (sink, take, duplicate, acks)."""
    import zmq

    from ffpipe import config, transport
    from ffpipe.metrics import MetricsWriter
    from ffpipe.progress import RunProgress
    from ffpipe.sink import Sink
    from ffpipe.topology import Topology

    cfg = config.preset("quick", layers=(16, 16), epochs=1, negatives="random", checkpoint_every=10, out=str(tmp_path))
    topo = Topology.local(2)
    ctx = zmq.Context()
    acks = transport.pull(ctx, topo.source.bind_url("127.0.0.1"))
    control = transport.push(ctx, topo.source.connect_url(), linger_ms=0)
    sink = Sink(cfg, topo, tmp_path, show_progress=False)
    sink.t0 = time.perf_counter()  # as `run` starts its clock
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        yield (sink, lambda msg: sink._take(msg, metrics, control, RunProgress(1, enabled=False)),
               lambda msg: sink._duplicate(msg, metrics, control), acks)
    control.close()
    acks.close()
    ctx.term()


def _held(seq: int, layers_hold: int):
    """Train batch seq + 1 as the last layer forwards it, each layer's checkpoint holding batch `layers_hold`."""
    import torch

    from ffpipe.wire import Message

    return Message("train", seq, 0, {"total": 500, "classes": 10, "batch": seq + 1, "durable.0": layers_hold,
                                     "durable.1": layers_hold}, {"y": torch.zeros(4, dtype=torch.long), "idx": torch.arange(4)})


def test_a_sink_catching_up_on_layers_far_ahead_lets_the_source_forget_as_it_goes(sink_at_hand):
    """The hang CI met once: the sink killed and restarted, the layers had run ahead and held batch 170 in their
    checkpoints; the sink took the resent batches, saved once (when it first heard of 170), and never again, since the
    layers' 170 did not move; so the source, whose window of unconfirmed batches was full, sent nothing new and
    resent the same batches for ever. The sink now saves every checkpoint interval of batches it takes that the
    layers hold."""
    from ffpipe import checkpoint, transport

    sink, take, _, acks = sink_at_hand
    for seq in range(70):
        take(_held(seq, 170))
    assert sink.durable_batch == 170 and sink.durable_next >= 61  # was 1: saved only at the first batch
    saved = checkpoint.load(sink.out / "sink.pt")
    assert saved["expected"] == sink.durable_next and saved["durable_batch"] == 170
    said = []
    while (ack := transport.recv(acks, 200)) is not None:
        said.append(ack.scalars["durable_next"])
    assert said and max(said) == sink.durable_next  # and the source was told


def test_a_resent_batch_tells_the_sink_what_the_layers_hold_now(sink_at_hand):
    """Resent batches are the only news of the layers' checkpoints while the source waits: a duplicate is not taken
    again, but the layers' durable batch it carries is saved and confirmed."""
    sink, take, duplicate, _ = sink_at_hand
    for seq in range(30):
        take(_held(seq, 20))
    assert (sink.durable_next, sink.durable_batch) == (20, 20)  # saved on reaching what the layers hold
    duplicate(_held(3, 30))
    assert (sink.durable_next, sink.durable_batch, sink.duplicates) == (30, 30, 1)
    assert sink.received["train"] == 30  # not taken twice


def test_a_message_the_sink_refuses_leaves_its_counts_its_rounds_and_its_readout_as_they_were(sink_at_hand):
    """Every check comes before the first change: a malformed eval (goodness of bool) once counted its rows into
    the round before failing, and the real message of the same stream number then completed it at half the
    accuracy; a train message with a non-numeric loss was counted, then refused, then taken again."""
    import torch

    from ffpipe.wire import Message

    sink, take, _, _ = sink_at_hand
    y = torch.zeros(4, dtype=torch.long)
    bad_loss = Message("train", 0, 0, {"total": 500, "classes": 10, "batch": 1, "loss.0": "high"}, {"y": y, "idx": torch.arange(4)})
    with pytest.raises(ValueError, match="loss.0 must be a number"):
        take(bad_loss)
    assert sink.received["train"] == 0 and sink.samples == 0 and sink.expected == 0
    take(_held(0, 0))
    scalars = {"classes": 10, "round": 1, "batches": 1, "split": "test"}
    right = torch.zeros(4, 10)
    right[:, 0] = 1.0  # every image scored right
    with pytest.raises(ValueError, match="float goodness"):
        take(Message("eval", 1, 1, scalars, {"y": y, "goodness": torch.zeros(4, 10, dtype=torch.bool)}))
    assert sink.received["eval"] == 0 and sink.rounds == {} and sink.expected == 1
    take(Message("eval", 1, 1, scalars, {"y": y, "goodness": right}))
    assert sink.received == {"train": 1, "eval": 1} and [(h["accuracy"], h["samples"]) for h in sink.history] == [(1.0, 4)]


def _source_unconfirmed(tmp_path, peer_timeout_s: float, ack: dict | None = None, **cfg):
    """A Source of a 144-batch digits run against a layer 0 that takes every message and forwards none, and, with
    `ack`, a sink that says `ack` every 50 ms and confirms nothing. Returns the Source once it gave up, and the
    stream numbers layer 0 took."""
    import threading

    import zmq

    from ffpipe import config, data, transport
    from ffpipe.source import Source
    from ffpipe.topology import Topology
    from ffpipe.wire import Message

    cfg = config.preset("quick", layers=(16, 16), epochs=1, batch_size=10, negatives="random", checkpoint_every=1,
                        out=str(tmp_path), **cfg)
    topo = Topology.local(2)
    ctx = zmq.Context()
    layer0 = transport.pull(ctx, topo.layers[0].bind_url("127.0.0.1"), hwm=10_000)
    sink = transport.push(ctx, topo.source.connect_url(), linger_ms=0)
    taken, done = [], threading.Event()

    def layer_and_sink():
        while not done.is_set():
            while layer0.poll(0):
                taken.append(transport.recv(layer0, 0).seq)
            if ack is not None:
                try:  # as the sink does: an acknowledgement the source has no room for is dropped
                    transport.send_nowait(sink, Message("ack", 0, 0, ack))
                except transport.PeerTimeout:
                    pass
            done.wait(0.05)  # the sink's acknowledgements come on their own clock

    thread = threading.Thread(target=layer_and_sink)
    thread.start()
    source = Source(cfg, data.load("digits", ""), topo, peer_timeout_s=peer_timeout_s)
    try:
        with pytest.raises(transport.PeerTimeout, match="window of unconfirmed batches full"):
            source.run()
    finally:
        done.set()
        thread.join()
        sink.close()
        layer0.close()
        ctx.term()
    return source, taken


@pytest.mark.timeout(60)
def test_a_source_whose_window_is_full_and_whose_sink_never_answers_gives_up_with_one_line(tmp_path):
    """Layer 0 takes every batch, but no sink ever confirms one: the source fills its window of unconfirmed
    batches and then waits for acknowledgements. That wait had no time limit; it ends at the peer timeout now."""
    source, taken = _source_unconfirmed(tmp_path, 1.5)
    assert source.pending_train == source.window == 66 and taken == list(range(66))  # sent the window, then nothing


@pytest.mark.timeout(60)
@pytest.mark.parametrize("idle", [True, False])
def test_a_source_resends_what_a_sink_lost_before_its_first_confirmation_once_every_layer_waits(tmp_path, idle):
    """A sink lost before it confirmed anything (restarted, it holds nothing, and every layer has forwarded what
    it had): the source's timed resend only started after a first confirmation, so the run waited out the peer
    timeout. It now resends once the sink has said for retransmit_s that every layer waits for input; while a
    layer works (a slow first batch) it waits."""
    ack = {"next": 0, "durable_next": 0, "durable_batch": 0, "idle": idle}
    source, taken = _source_unconfirmed(tmp_path, 2, ack, retransmit_s=0.3)
    if idle:
        assert source.sent["retransmissions"] >= 1 and taken.count(0) == 1 + source.sent["retransmissions"]
    else:
        assert source.sent["retransmissions"] == 0 and taken == list(range(66))


def test_the_sink_calls_the_pipeline_idle_once_every_role_beats_and_every_layer_waits(sink_at_hand):
    from ffpipe import transport
    from ffpipe.wire import Message

    sink, take, _, acks = sink_at_hand

    def beat(role, state):
        sink._heartbeat(Message("heartbeat", 0, 0, {"role": role, "pid": 1, "state": state}))

    beat("layer 0", "waiting")
    beat("layer 1", "waiting")
    assert not sink._idle()  # the source has not beaten yet
    beat("source", "sending")
    assert sink._idle()
    beat("layer 1", "working")  # a slow first batch
    assert not sink._idle()
    beat("layer 1", "waiting")
    sink.heard["layer 0"] = (time.monotonic() - transport.SILENT_S - 1, sink.heard["layer 0"][1])
    assert not sink._idle()  # a stopped or hung layer beats no more: a stall, not a loss
    beat("layer 0", "waiting")
    take(_held(0, 1))  # the layers hold more: saved and acknowledged at once
    assert transport.recv(acks, 2000).scalars["idle"] is True


def test_the_sink_reports_a_silent_role_only_once_it_has_read_what_waits_in_its_inbox(sink_at_hand, capsys):
    """A sink busy for seconds (its first readout step used to import torch's compiler) finds every role's last
    heartbeat old, though their newer ones wait in its inbox: it named them all silent, falsely. It now waits
    until the inbox is drained; a role still unheard then is silent, and reported once."""
    from ffpipe import transport
    from ffpipe.wire import Message

    sink, *_ = sink_at_hand
    beat = Message("heartbeat", 0, 0, {"role": "layer 1", "pid": 4242, "state": "sending"})
    sink._heartbeat(beat)
    sink.heard["layer 1"] = (time.monotonic() - transport.SILENT_S - 1, beat.scalars)  # heard last SILENT_S + 1 ago
    sink._check_silence(pending=lambda: True)
    assert not sink.silent and "nothing from" not in capsys.readouterr().out
    sink._check_silence(pending=lambda: False)
    sink._check_silence(pending=lambda: False)
    said = capsys.readouterr().out
    assert sink.silent == {"layer 1"} and said.count("nothing from layer 1 (pid 4242)") == 1 and "it was sending" in said
    sink._heartbeat(beat)
    assert not sink.silent and "layer 1 is back after" in capsys.readouterr().out
    assert len(sink.silences["layer 1"]) == 1


def test_the_source_reads_its_inbox_before_calling_the_sink_silent(tmp_path, capsys):
    """The same for the source: an acknowledgement waiting unread is news of the sink, not silence."""
    import zmq

    from ffpipe import config, data, transport
    from ffpipe.source import Source
    from ffpipe.topology import Topology
    from ffpipe.wire import Message

    cfg = config.preset("quick", layers=(16, 16), epochs=1, negatives="random", out=str(tmp_path))
    topo = Topology.local(2)
    source = Source(cfg, data.load("digits", ""), topo)
    ctx = zmq.Context()
    inbox = transport.pull(ctx, topo.source.bind_url("127.0.0.1"))
    sink = transport.push(ctx, topo.source.connect_url(), linger_ms=0)
    try:
        source.heard_at = time.monotonic() - transport.SILENT_S - 1
        transport.send(sink, Message("ack", 0, 0, {"next": 0, "durable_next": 0, "durable_batch": 0}), 0)
        source._drain(inbox, 2000)
        assert not source.sink_silent and "nothing from the sink" not in capsys.readouterr().out
        source.heard_at = time.monotonic() - transport.SILENT_S - 1
        source._drain(inbox)
        assert source.sink_silent and "nothing from the sink for" in capsys.readouterr().out
    finally:
        sink.close()
        inbox.close()
        ctx.term()


def _without_the_stop(path):
    payload = {k: v for k, v in checkpoint.load(path).items() if k not in ("format", "sha256")}
    checkpoint.save(path, {**payload, "stop": None, "stop_seq": 0})


@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", ["layer 1", "sink"])
def test_a_role_restarted_in_the_final_stop_gets_it_from_the_layer_before_which_had_gone(finished, tmp_path, victim,
                                                                                          monkeypatch):
    """Layer 1 (or the sink) dies in the final stop after the layer before it passed the stop on and exited: its
    checkpoint holds every batch but not the stop, nor does the sink's. The launcher restarts it and starts the
    layer before it again, which forwards the stop from its checkpoint; the sink takes it and the run finishes
    (the restarted role waited out peer timeouts before, since the source resends its stop to layer 0 only)."""
    import dataclasses
    import shutil

    from ffpipe import data, launcher as launcher_module
    from ffpipe.launcher import Child, Launcher
    from ffpipe.topology import Topology

    monkeypatch.setattr(launcher_module, "STOP_PASS_GRACE_S", 1.0)  # how long the layer before must be gone first
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for name in ("layer1.pt", "sink.pt") if victim == "layer 1" else ("sink.pt",):
        _without_the_stop(out / name)
    (out / "summary.json").unlink()
    cfg = dataclasses.replace(_config(finished), out=str(out))
    launcher = Launcher(cfg, data.load("digits", ""), ["cpu", "cpu"], 1, show_progress=False, restart="on-failure")
    launcher.topo, launcher.started_at = Topology.local(2), time.time()
    launcher.flags = ["--config", str(out / "config.json"), "--out", str(out), *launcher.topo.as_flags()]
    (out / "config.json").write_text(cfg.to_json())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # roles that have finished: exit code 0
    dead = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    gone.wait(), dead.wait()
    if victim == "layer 1":
        roles = [launcher._spawn("sink", None, "cpu", launcher.flags, resume=True), Child("layer", 1, "cpu", dead)]
    else:
        roles = [Child("sink", None, "cpu", dead), Child("layer", 1, "cpu", gone)]
    launcher.children = [*roles, Child("layer", 0, "cpu", gone), Child("source", None, "cpu", gone)]
    try:
        assert launcher._watch() is False  # every role exited 0 and the summary is not an interrupted run's
    finally:
        launcher._kill_all()
    assert launcher.restarts == {victim: 1}
    s = _summary(out)
    assert s["accounting"]["complete"] and s["history"] == _summary(finished)["history"]
    assert checkpoint.load(out / "layer1.pt")["stop"] and checkpoint.load(out / "sink.pt")["stop"]
