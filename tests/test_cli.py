"""The command line through typer's CliRunner: real runs, clear errors, exit codes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_idx_dataset, write_idx
from ffpipe import checkpoint
from ffpipe.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small digits run shared by the eval/predict tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = _run("run", "--inprocess", "--dataset", "digits", "--layers", "64,64", "--epochs", "3", "--threads", "1",
                  "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_run_writes_summary(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["dataset"] == "digits" and summary["mode"] == "inprocess" and summary["epochs"] == 3
    assert summary["layers"] == [64, 64]


def test_default_run_without_data_falls_back_to_digits_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./data does not exist here
    result = _run("run", "--no-download", "--layers", "32,32", "--epochs", "1", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "digits" in result.output
    summary = json.loads((tmp_path / "runs" / "latest" / "summary.json").read_text())
    assert summary["dataset"] == "digits" and summary["preset"] == "quick"


def test_run_on_mnist_files_in_data_dir(tmp_path):
    make_idx_dataset(tmp_path / "data" / "MNIST" / "raw", n_train=200, n_test=50)
    result = _run("run", "--inprocess", "--dataset", "mnist", "--data-dir", tmp_path / "data", "--layers", "40,40",
                  "--epochs", "2", "--batch-size", "20", "--threads", "1", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["dataset"] == "mnist"


def test_eval_reproduces_the_run_accuracy(trained):
    result = _run("eval", "--checkpoint", trained)
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.loads((trained / "summary.json").read_text())
    assert line["accuracy"] == pytest.approx(summary["test_accuracy"]) and line["samples"] == 360


def test_eval_reports_per_class_accuracy_and_draws_the_confusion_matrix(trained, tmp_path):
    result = _run("eval", "--checkpoint", trained, "--confusion", tmp_path / "cm.png")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    counts = torch.tensor(line["confusion"])
    assert counts.shape == (10, 10) and counts.sum() == 360
    assert counts.trace().item() / 360 == pytest.approx(line["accuracy"])  # the diagonal is what was right
    per_class = list(line["per_class"].values())
    assert per_class == pytest.approx((counts.diagonal() / counts.sum(1)).tolist(), abs=1e-4)
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_can_blur_the_test_images(trained):
    from ffpipe.data import blur, load
    from ffpipe.model import evaluate
    from ffpipe.serve import load_model

    result = _run("eval", "--checkpoint", trained, "--test-blur", "1.5")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    net, _ = load_model(trained)
    test = load("digits", "data").test
    assert line["test_blur"] == 1.5 and line["accuracy"] == pytest.approx(evaluate(net, blur(test.x, 1.5), test.y)["accuracy"])
    assert json.loads(_run("eval", "--checkpoint", trained).stdout.strip().splitlines()[-1])["test_blur"] == 0.0  # the run's
    bad = _run("eval", "--checkpoint", trained, "--test-blur", "-1")
    assert bad.exit_code == 1 and "--test-blur must be >= 0" in bad.output


def test_eval_can_add_the_mirror_images_scores(trained):
    from ffpipe.data import load
    from ffpipe.model import evaluate
    from ffpipe.serve import load_model

    result = _run("eval", "--checkpoint", trained, "--tta-flip")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    net, _ = load_model(trained)
    test = load("digits", "data").test
    assert line["tta_flip"] is True
    assert line["accuracy"] == pytest.approx(evaluate(net, test.x, test.y, tta_flip=True)["accuracy"])
    assert json.loads(_run("eval", "--checkpoint", trained).stdout.strip().splitlines()[-1])["tta_flip"] is False


def test_eval_and_predict_can_score_by_the_readout_and_the_goodness_both(trained, tmp_path):
    from ffpipe.data import load
    from ffpipe.model import evaluate
    from ffpipe.serve import load_model

    refused = _run("eval", "--checkpoint", trained, "--predict", "both")  # the threshold loss: goodness is no probability
    assert refused.exit_code == 1 and "--predict both needs a model trained with --loss competitive" in refused.output
    competitive = tmp_path / "competitive"
    assert _run("run", "--inprocess", "--dataset", "digits", "--layers", "64,64", "--epochs", "3", "--loss", "competitive",
                "--peer-norm", "0", "--negatives", "random", "--predict", "readout", "--threads", "1", "--out", competitive,
                "--quiet").exit_code == 0
    result = _run("eval", "--checkpoint", competitive, "--predict", "both")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    net, _ = load_model(competitive)
    test = load("digits", "data").test
    assert line["predict"] == "both" and line["accuracy"] == pytest.approx(evaluate(net, test.x, test.y, mode="both")["accuracy"])
    rows = [json.loads(r) for r in _run("predict", "--checkpoint", competitive, "--predict", "both", *_images(tmp_path, 2)).stdout.splitlines()]
    assert len(rows) == 2 and all(max(r["scores"]) <= 0 for r in rows)  # log-probabilities


def _images(folder, n):
    paths = []
    for i in range(n):
        p = folder / f"digit{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 20), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_predict_classifies_image_files(trained, tmp_path):
    paths = _images(tmp_path, 2)
    result = _run("predict", "--checkpoint", trained, *paths)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    assert all(0 <= r["label"] < 10 and len(r["scores"]) == 10 for r in rows)


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--layers", "abc"], "is not a width"),
        (["run", "--layers", "500,conv8"], "cannot follow"),
        # refused by the pipeline's launcher before it starts a process, as by the in-process trainer
        (["run", "--dataset", "digits", "--loss", "competitive", "--layers", "conv4k3p2,20"], "one channel per class: 4 < 10"),
        (["run", "--dataset", "digits", "--layers", "conv8p4,conv8p4,conv8p4"], "too small"),
        (["run", "--dataset", "digits", "--inprocess", "--loss", "competitive", "--layers", "20,8"], "one channel per class: 8 < 10"),
        (["run", "--preset", "fastest"], "unknown preset"),
        (["run", "--layers", "99999999999,20"], "at most 1,048,576 units"),
        (["run", "--threads", "100000"], "threads must be at most 1024"),
        (["run", "--shift", "3000000000"], "--shift must be at most 64; got 3000000000"),
        (["run", "--layer-addrs", "127.0.0.1:x", "--index", "3"], "--index, --layer-addrs place one role started with --role"),
        (["run", "--batch-size", "99999999999999999999"], "--batch-size must be at most 1,048,576"),
        (["run", "--epochs", "99999999999"], "--epochs must be at most 1,000,000"),
        (["run", "--dataset", "digits", "--shift", "4"], "--shift 4: digits's images are 8x8; shift them by less than half that (at most 3)"),
        (["run", "--dataset", "digits", "--val-size", "100000"], "--val-size 100000 must be smaller than the 1,437 training images digits has"),
        (["run", "--dataset", "digits", "--train-size", "100000"], "--train-size 100000 is more than the 1,437 training images digits has"),
        (["run", "--seed", "99999999999999999999999"], "seed must be an integer in [0, 2**63)"),
        (["run", "--dataset", "imagenet"], "dataset must be one of"),
        (["run", "--epochs", "0"], "epochs"),
        (["run", "--test-blur", "-1"], "--test-blur must be >= 0"),
        (["run", "--norm", "batch"], "norm"),
        (["run", "--optimizer", "lbfgs"], "--optimizer must be sgd or adam; got 'lbfgs'"),
        (["run", "--readout-optimizer", "lbfgs"], "--readout-optimizer must be sgd or adam; got 'lbfgs'"),
        (["run", "--dataset", "mnist", "--data-dir", "/nonexistent/ffpipe", "--no-download"], "/nonexistent/ffpipe"),
        (["eval", "--checkpoint", "/nonexistent/run"], "no checkpoint"),
        (["predict", "--checkpoint", "/nonexistent/run", "x.png"], "no checkpoint"),
    ],
)
def test_bad_input_gives_one_clear_error_and_exit_code(args, message):
    result = _run(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_eval_refuses_data_of_another_shape_and_a_role_checkpoint_and_an_unwritable_confusion(trained, tmp_path):
    mnist = tmp_path / "mnist-run"
    make_idx_dataset(tmp_path / "data28" / "MNIST" / "raw")
    assert _run("run", "--inprocess", "--dataset", "mnist", "--data-dir", tmp_path / "data28", "--no-download", "--layers", "16,16",
                "--epochs", "1", "--threads", "1", "--out", mnist, "--quiet").exit_code == 0
    raw = tmp_path / "data14" / "MNIST" / "raw"  # the same files, with 14x14 images
    for split, n in (("train", 64), ("t10k", 32)):
        write_idx(raw / f"{split}-images-idx3-ubyte", np.zeros((n, 14, 14)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    result = _run("eval", "--checkpoint", mnist, "--data-dir", tmp_path / "data14")
    assert result.exit_code == 1 and "holds 10 classes of 1x14x14 images; the model was trained on 10 classes of 1x28x28" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output

    for flag, value in (("--split", "bogus"), ("--predict", "bogus")):
        result = _run("eval", "--checkpoint", trained, flag, value)
        assert result.exit_code == 1 and f"error: {flag} must be " in result.output, result.output

    role = tmp_path / "layer0.pt"
    checkpoint.save(role, {"layer": {}, "config": "{}"})
    result = _run("eval", "--checkpoint", role)
    assert result.exit_code == 1 and "holds one role of a pipelined run, not a model: give the run folder" in result.output

    result = _run("eval", "--checkpoint", trained, "--confusion", "/proc/ffpipe-confusion.png")  # root may, and cannot
    assert result.exit_code == 1 and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_eval_of_the_training_split_takes_the_images_the_run_trained_on(tmp_path):
    out = tmp_path / "run"
    assert _run("run", "--inprocess", "--dataset", "digits", "--layers", "16,16", "--epochs", "1", "--train-size", "300",
                "--val-size", "100", "--threads", "1", "--out", out, "--quiet").exit_code == 0
    result = _run("eval", "--checkpoint", out, "--split", "train")
    assert result.exit_code == 0 and json.loads(result.stdout.strip().splitlines()[-1])["samples"] == 300, result.output


def test_a_config_taken_from_a_run_folder_does_not_overwrite_that_run(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "out": str(run)}))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = _run("run", "--config", run / "config.json", "--inprocess", "--quiet")
    assert result.exit_code == 1 and f"would write this run into {run}, over the run it came from; give --out" in result.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert _run("run", "--config", run / "config.json", "--inprocess", "--epochs", "1", "--out", tmp_path / "new", "--quiet").exit_code == 0


def test_a_refused_inprocess_resume_writes_nothing(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)  # 3 epochs trained
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = _run("run", "--resume", run, "--epochs", "2", "--quiet")
    assert result.exit_code == 1 and "has trained 3 epochs, and --epochs 2 asks for no more; nothing to resume" in result.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert _run("run", "--resume", run, "--epochs", "4", "--quiet").exit_code == 0


def test_corrupt_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = _run("eval", "--checkpoint", tmp_path)
    assert result.exit_code == 1 and "corrupt" in result.output


def test_unreadable_image_is_named(trained, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    result = _run("predict", "--checkpoint", trained, bad)
    assert result.exit_code == 1 and "bad.png" in result.output


def test_presets_and_version():
    result = _run("presets")
    assert result.exit_code == 0 and all(f"\n{name}: " in result.output for name in ("quick", "hinton", "seed"))
    assert "quick: layers=500,500, epochs=5\n  on digits: epochs=40, batch_size=50\n" in result.output  # what a digits run gets
    assert "layer.norm=l2" in result.output and "on cifar10: val_size=0, epochs=3000" in result.output
    assert _run("--version").output.startswith("ffpipe ")


@pytest.mark.timeout(180)
def test_ctrl_c_stops_an_inprocess_run_and_says_which_epoch_is_saved(tmp_path):
    import signal
    import subprocess
    import sys

    from ffpipe import checkpoint

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ffpipe", "run", "--inprocess", "--dataset", "digits", "--layers", "64,64",
                             "--epochs", "1000", "--eval-every", "1", "--threads", "1", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said = []
        while not said or not said[-1].startswith("epoch    2/1000"):  # epoch 1 is evaluated and saved before epoch 2
            said.append(proc.stderr.readline())
            assert said[-1], "".join(said)  # the run ended
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    saved = checkpoint.load(out / checkpoint.FILENAME)["epoch"]
    assert proc.returncode == 130, err
    assert 1 <= saved < 1000 and f"interrupted; epoch {saved} of 1000 is saved: continue with ffpipe run --resume {out}" in err, err


@pytest.mark.parametrize("pipeline, flags, message", [
    (False, ["--layers", "30,30"], "layers=[64, 64]); drop the flags that change it"),
    (False, ["--dataset", "mnist"], 'dataset="digits"'),
    (False, ["--whiten", "0.5"], "whiten=0.0); drop the flags that change it"),  # the inputs the layers learned from
    (True, ["--batch-size", "20", "--seed", "3"], "batch_size=50, seed=0); drop the flags that change them"),
    (False, ["--optimizer", "adam"], 'optim.name="sgd"); drop the flags that change it'),  # its state is SGD's
    (True, ["--readout-optimizer", "adam"], 'readout_optim.name="sgd"); drop the flags that change it'),
])
def test_a_refused_resume_leaves_the_run_folder_as_it_was(trained, tmp_path, pipeline, flags, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    if pipeline:  # what makes --resume continue a folder as a pipeline
        (run / "run.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = _run("run", "--resume", run, *flags, "--quiet")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume continues the run as it was made (") and message in lines[0], result.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    if not pipeline:  # and it can still be resumed (in-process, with more epochs)
        assert _run("run", "--resume", run, "--epochs", "4", "--quiet").exit_code == 0


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: what an image bomb's header looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_an_image_bomb_and_an_unwritable_confusion_path_get_one_line(trained, tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header(30000, 30000))
    result = _run("predict", "--checkpoint", trained, tmp_path / "bomb.png")
    assert result.exit_code == 1 and "bomb.png: cannot read image" in result.output, result.output
    result = _run("eval", "--checkpoint", trained, "--confusion", tmp_path / "missing" / "cm.png")
    assert result.exit_code == 1 and "is not a folder this user can write to" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_an_inprocess_run_on_cuda_without_a_gpu_or_a_bad_queue_depth_gets_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = _run("run", "--inprocess", "--dataset", "digits", "--device", "cuda", "--out", tmp_path / "a")
    assert result.exit_code == 1 and "--device cuda: no CUDA device is visible" in result.output, result.output
    monkeypatch.setenv("FFPIPE_HWM", "abc")
    result = _run("run", "--dataset", "digits", "--out", tmp_path / "b")
    assert result.exit_code == 1 and "FFPIPE_HWM must be a positive integer" in result.output, result.output
    assert not (tmp_path / "b").exists()  # refused before the run folder was made


def test_flags_that_would_be_ignored_or_misread_are_refused_in_one_line(trained, tmp_path):
    """Each of these once did something else than asked, silently: wrote into the resumed folder instead of --out,
    trained on the CPU while config.json said cuda, scored by an untrained readout (every image class 0), ..."""
    import shutil

    pipelined = tmp_path / "pipelined"
    shutil.copytree(trained, pipelined)
    (pipelined / "run.json").write_text("{}")  # what makes a folder a pipelined run
    config_json = trained / "config.json"
    (tmp_path / "file").write_text("")
    untrained = tmp_path / "no-readout"
    assert _run("run", "--inprocess", "--dataset", "digits", "--layers", "16,16", "--epochs", "1", "--negatives", "random",
                "--threads", "1", "--out", untrained, "--quiet").exit_code == 0
    for args, message in (
        (["run", "--resume", trained, "--out", tmp_path / "elsewhere"], f"--resume continues the run in {trained} itself; drop --out"),
        (["run", "--resume", pipelined, "--inprocess"], "is a pipelined run: resume it as one (without --inprocess)"),
        (["run", "--config", config_json, "--preset", "hinton"], "was made with the quick preset and sets every field; drop --preset"),
        (["run", "--dataset", "digits", "--device", "cuda", "--out", tmp_path / "r"], "a pipeline places its layers with --devices"),
        (["eval", "--checkpoint", untrained, "--predict", "readout"], "readout was never trained"),
        (["predict", "--checkpoint", untrained, "--predict", "readout", tmp_path / "file"], "readout was never trained"),
        (["eval", "--checkpoint", trained, "--confusion", tmp_path], "is a folder; give the PNG file to write"),
        (["bench", "--synthetic", "--out", tmp_path / "file"], "is a file; the bench writes a folder"),
        (["bench", "--synthetic", "--seed", "-1"], "--seed must be in [0, 2**63); got -1"),
        (["bench", "--synthetic", "--accuracy-timeout", "nan"], "must be finite and > 0"),
        (["compose", "--layers", "100000", "--out", "-"], "--layers must be 1 to 256"),
    ):
        result = _run(*args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.output)
    assert json.loads(config_json.read_text())["preset"] == "quick" and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("flags, message", [
    (["--retransmit-after", "0"], "--retransmit-after must be > 0"),  # the config field is retransmit_s
    (["--readout-lr", "-1"], "--readout-lr must be > 0"),  # the readout's optimizer and the layers' both call it lr
    (["--lr", "nan"], "--lr must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--val-size", "-3"], "--val-size must be >= 0"),
])
def test_a_bad_value_is_named_by_its_flag(flags, message, tmp_path):
    result = _run("run", "--dataset", "digits", *flags, "--out", tmp_path)
    assert result.exit_code == 1 and f"error: {message}; got " in result.output, result.output
