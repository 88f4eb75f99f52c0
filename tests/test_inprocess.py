"""The in-process trainer: it learns, it is deterministic, it writes the run folder."""

import json
import re

import pytest
import torch
from torch.testing import assert_close

from ffpipe import checkpoint, config, data, inprocess
from ffpipe.serve import load_model


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", ".", download=False)


def _cfg(tmp_path, **kw):
    base = dict(dataset="digits", layers=(128, 128), epochs=8, batch_size=50, threads=1, out=str(tmp_path / "run"))
    return config.preset("quick", **{**base, **kw})


def test_learns_digits_and_writes_the_run_folder(tmp_path, digits):
    cfg = config.override_nested(_cfg(tmp_path), optim=dict(lr=3e-3))
    summary = inprocess.train(cfg, digits, show_progress=False)
    assert summary["test_accuracy"] > 0.85, summary["history"]
    out = tmp_path / "run"
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("dataset", "mode", "layers", "epochs", "test_accuracy", "train_samples_per_s", "wall_s"):
        assert key in on_disk
    assert on_disk["mode"] == "inprocess" and on_disk["layers"] == [128, 128] and 0 < on_disk["test_accuracy"] <= 1
    assert on_disk["train_samples_per_s"] > 0 and len(on_disk["history"]) == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert {r["layer"] for r in train} == {0, 1}
    assert all({"loss", "g_pos", "g_neg"} <= r.keys() for r in train)
    # the checkpoint loads with weights_only=True and predicts what the trained net predicts
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["format"] == checkpoint.FORMAT and payload["epoch"] == 8
    net, meta = load_model(out)
    from ffpipe.model import evaluate
    assert evaluate(net, digits.test.x, digits.test.y)["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert meta["name"] == "digits"


def test_same_seed_same_weights_different_seed_different_weights(tmp_path, digits):
    def weights(seed, sub):
        inprocess.train(_cfg(tmp_path / sub, epochs=1, seed=seed), digits, show_progress=False)
        return load_model(tmp_path / sub / "run")[0].state_dict()

    a, b, c = weights(1, "a"), weights(1, "b"), weights(2, "c")
    for key in a:
        assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["layers.0.linear.weight"], c["layers.0.linear.weight"])


def test_greedy_schedule_trains_one_layer_after_another(tmp_path, digits):
    cfg = _cfg(tmp_path, schedule="greedy", negatives="random", epochs=2)
    inprocess.train(cfg, digits, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    layers = [r["layer"] for r in records if r["kind"] == "train"]
    assert layers == sorted(layers) and set(layers) == {0, 1}


def test_validation_split_is_evaluated_and_test_reported_once(tmp_path):
    d = data.load("digits", ".", val_size=200)
    summary = inprocess.train(_cfg(tmp_path, epochs=2), d, show_progress=False)
    assert all(h["split"] == "val" for h in summary["history"])
    assert summary["val_accuracy"] is not None and summary["test_accuracy"] is not None


def test_random_negatives_readout_prediction_and_seed_recipe_math_run(tmp_path, digits):
    for kw in (dict(negatives="random", predict="readout"), dict(standardize=True, label_value=None)):
        summary = inprocess.train(_cfg(tmp_path, epochs=1, **kw), digits, show_progress=False)
        assert 0 <= summary["test_accuracy"] <= 1


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, digits, monkeypatch):
    straight = inprocess.train(_cfg(tmp_path / "a", epochs=4), digits, show_progress=False)
    real_evaluate = inprocess._evaluate

    def interrupt_in_epoch_three(net, split, epoch, *args):
        if epoch == 3:
            raise KeyboardInterrupt
        return real_evaluate(net, split, epoch, *args)

    monkeypatch.setattr(inprocess, "_evaluate", interrupt_in_epoch_three)
    cfg = _cfg(tmp_path / "b", epochs=4)
    with pytest.raises(KeyboardInterrupt):
        inprocess.train(cfg, digits, show_progress=False)
    monkeypatch.setattr(inprocess, "_evaluate", real_evaluate)
    saved = checkpoint.load(tmp_path / "b" / "run")
    assert saved["epoch"] == 2
    resumed = inprocess.train(cfg, digits, show_progress=False, resume=saved)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    a, b = load_model(tmp_path / "a" / "run")[0].state_dict(), load_model(tmp_path / "b" / "run")[0].state_dict()
    for key in a:
        assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed["test_accuracy"] == pytest.approx(straight["test_accuracy"])
    with pytest.raises(ValueError, match="has trained 4 epochs, and --epochs 4 asks for no more; nothing to resume"):
        inprocess.train(cfg, digits, show_progress=False, resume=checkpoint.load(tmp_path / "b" / "run"))


@pytest.mark.parametrize("negatives, message", [
    ("random", r"^layer 0: the loss is not finite: .*\(a lower --lr may help\)$"),
    ("hard", r"^the readout's loss is not finite: the layers' outputs hold NaN or Inf"),  # its neutral pass comes first
])
def test_a_diverging_run_stops_with_a_clear_error_instead_of_training_on_nan(tmp_path, digits, negatives, message):
    from ffpipe.layer import NonFiniteLoss

    cfg = config.override_nested(_cfg(tmp_path, epochs=1, negatives=negatives, predict="readout" if negatives == "hard" else "goodness"),
                                 optim=dict(lr=1e30))  # the weights overflow in a step or two
    with pytest.raises(NonFiniteLoss, match=message):
        inprocess.train(cfg, digits, show_progress=False)


@pytest.mark.parametrize("negatives, predict, first", [("random", "goodness", "layer 0"),
                                                       ("hard", "readout", "the readout")])  # its neutral pass comes first
def test_a_run_whose_steps_the_device_skips_stops_before_it_logs_or_saves(tmp_path, digits, monkeypatch, negatives, predict, first):
    """As on a GPU (run here with the CPU's fused kernels): a step whose loss is not finite is skipped on the device
    and counted there, without a host sync per step; the run reads the counts before it logs, evaluates or saves,
    and stops with one line: nothing logged, nothing saved."""
    from ffpipe import layer
    from ffpipe.layer import NonFiniteLoss

    monkeypatch.setattr(layer, "READ_LOSS_FIRST", ())
    cfg = config.override_nested(_cfg(tmp_path, epochs=1, negatives=negatives, predict=predict),
                                 optim=dict(name="adam", lr=1e30), readout_optim=dict(name="adam"))
    with pytest.raises(NonFiniteLoss) as refused:
        inprocess.train(cfg, digits, show_progress=False)
    assert refused.value.args[0].startswith(first), refused.value
    assert re.fullmatch(r"((layer \d|the readout) \(\d+ steps?\)(, |: ))+the loss was not finite, and the device skipped those "
                        r"steps: .*\(a lower --lr may help\)", refused.value.args[0]), refused.value
    run = tmp_path / "run"
    assert not (run / checkpoint.FILENAME).exists()  # one epoch: its checkpoint would come after the check
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "train"], records  # no NaN loss logged as a figure


def test_ctrl_c_is_raised_between_batches_and_the_handler_is_put_back():
    import os
    import signal

    before, reached = signal.getsignal(signal.SIGINT), False
    with pytest.raises(KeyboardInterrupt), inprocess.ctrl_c_between_batches() as interrupted:
        interrupted()  # nothing came yet
        os.kill(os.getpid(), signal.SIGINT)  # lands in the handler, which only notes it ...
        for _ in range(1000):  # ... wherever the main thread is: nothing raised until the loop asks
            torch.ones(1)
        reached = True
        interrupted()
    assert reached and signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), inprocess.ctrl_c_between_batches():  # a second Ctrl-C: at once
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            torch.ones(1)
