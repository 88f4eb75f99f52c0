"""The `ffpipe` command line: parse options, build a config, call one function. Errors become exit code 1 here."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import zmq
from rich.console import Console

from ffpipe import __version__
from ffpipe.checkpoint import CheckpointError
from ffpipe.data import DataError
from ffpipe.launcher import PipelineError
from ffpipe.layer import Diverged
from ffpipe.model import MAX_WHITENED
from ffpipe.transport import STOPPED_ALONE, PeerTimeout

app = typer.Typer(add_completion=False, no_args_is_help=False, help="Forward-Forward training, one process per layer.")
err = Console(stderr=True, soft_wrap=True)

_PANEL_DATA, _PANEL_MODEL, _PANEL_TRAIN, _PANEL_RUN, _PANEL_PIPE = "Data", "Model", "Training", "Machinery", "Pipeline"


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


SOURCE_ADDR, SINK_ADDR = "127.0.0.1:5550", "127.0.0.1:5549"  # --role's defaults


def _os_error(e: OSError) -> str:
    """"FILE: reason", or the reason alone when the OS names no file (a write to a full disk)."""
    if not e.strerror:
        return str(e)
    return f"{e.filename}: {e.strerror}" if e.filename else e.strerror


def _flag_named(message: str) -> str:
    """A config's "retransmit_s must be > 0" as the user typed it: "--retransmit-after must be > 0"."""
    import dataclasses

    from ffpipe.config import LayerConfig, RunConfig

    field, sep, rest = message.partition(" must be ")
    flags = {f.name: "--" + f.name.replace("_", "-") for cls in (RunConfig, LayerConfig) for f in dataclasses.fields(cls)}
    flags["retransmit_s"] = "--retransmit-after"
    return f"{flags[field]}{sep}{rest}" if sep and field in flags else message


def _parse_layers(text: str | None) -> tuple[int | str, ...] | None:
    if text is None:
        return None
    from ffpipe.layer import LayerSpec

    try:
        specs = [LayerSpec.parse(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as e:
        raise ValueError(f"--layers: {e}; expected e.g. 500,500 or conv64k3p2,conv128k3p2,1000") from None
    if not specs:
        raise ValueError(f"--layers: expected comma-separated layers such as 500,500; got {text!r}")
    return tuple(s.units if not s.image else str(s) for s in specs)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ffpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Forward-Forward training: in one process, or as a pipeline with one process per layer."""


@app.command()
def run(
    preset: Annotated[Optional[str], typer.Option(help="Named recipe: quick, hinton or seed (`ffpipe presets` lists them). Default quick.", envvar="FFPIPE_PRESET", rich_help_panel=_PANEL_TRAIN)] = None,
    dataset: Annotated[Optional[str], typer.Option(help="auto, mnist, fashion-mnist, cifar10, fer2013, digits or synthetic (generated, no files). auto: MNIST if found or downloadable, else scikit-learn's 8x8 digits.", envvar="FFPIPE_DATASET", rich_help_panel=_PANEL_DATA)] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the datasets (default ./data).", envvar="FFPIPE_DATA_DIR", rich_help_panel=_PANEL_DATA)] = None,
    download: Annotated[Optional[bool], typer.Option("--download/--no-download", help="Download missing datasets with torchvision.", rich_help_panel=_PANEL_DATA)] = None,
    val_size: Annotated[Optional[int], typer.Option(help="Hold out this many training images for validation (evaluated instead of test during training); exact copies of training images are left out.", rich_help_panel=_PANEL_DATA)] = None,
    train_size: Annotated[Optional[int], typer.Option(help="Train on only the first N training images (0 = all); for quick experiments and benchmarks.", rich_help_panel=_PANEL_DATA)] = None,
    shift: Annotated[Optional[int], typer.Option(help="Augmentation: translate training images by up to N pixels (0 = off).", rich_help_panel=_PANEL_DATA)] = None,
    standardize: Annotated[Optional[bool], typer.Option("--standardize/--no-standardize", help="Subtract each channel's training mean and divide by its std.", rich_help_panel=_PANEL_DATA)] = None,
    equalize: Annotated[Optional[bool], typer.Option("--equalize/--no-equalize", help="Histogram-equalize every image (train, test, predict) before anything else.", rich_help_panel=_PANEL_DATA)] = None,
    whiten: Annotated[Optional[float], typer.Option(help="ZCA-whiten the inputs (after --standardize), fitted on the training images: EPS added to the covariance's eigenvalues, in units of an input's variance (1 for CIFAR-10); 0 = off.", rich_help_panel=_PANEL_DATA)] = None,
    test_blur: Annotated[Optional[float], typer.Option(help="Blur test images (and ffpipe predict's) with a Gaussian of this sigma in pixels, for a training set whose images were blurred (FER2013's image-folder copy: 3); 0 = off.", rich_help_panel=_PANEL_DATA)] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Augmentation: mirror training images left-right at random (CIFAR-10, FER2013).", rich_help_panel=_PANEL_DATA)] = None,
    layers: Annotated[Optional[str], typer.Option(help="Hidden layers: widths (1000,1000,1000) and/or image layers first (conv64k3p2,lc32k5s2,1000).", rich_help_panel=_PANEL_MODEL)] = None,
    norm: Annotated[Optional[str], typer.Option(help="Input normalization of every layer: rms or l2.", rich_help_panel=_PANEL_MODEL)] = None,
    goodness: Annotated[Optional[str], typer.Option(help="Goodness: sum or mean of squared activities.", rich_help_panel=_PANEL_MODEL)] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Goodness threshold per unit (times the width for sum goodness).", rich_help_panel=_PANEL_MODEL)] = None,
    loss: Annotated[Optional[str], typer.Option(help="Layer loss: threshold, symba or competitive.", rich_help_panel=_PANEL_MODEL)] = None,
    peer_norm: Annotated[Optional[float], typer.Option(help="Weight of peer normalization (0 = off).", rich_help_panel=_PANEL_MODEL)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training set.", rich_help_panel=_PANEL_TRAIN)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per mini-batch (each gives a positive and a negative).", rich_help_panel=_PANEL_TRAIN)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of every FF layer.", rich_help_panel=_PANEL_TRAIN)] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd (with momentum) or adam.", rich_help_panel=_PANEL_TRAIN)] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(help="constant, linear-half or cosine.", rich_help_panel=_PANEL_TRAIN)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay of every FF layer's optimizer.", rich_help_panel=_PANEL_TRAIN)] = None,
    negatives: Annotated[Optional[str], typer.Option(help="hard (sampled from the network's belief) or random wrong labels.", rich_help_panel=_PANEL_TRAIN)] = None,
    schedule: Annotated[Optional[str], typer.Option(help="joint (every layer on every batch) or greedy (layer after layer).", rich_help_panel=_PANEL_TRAIN)] = None,
    predict: Annotated[Optional[str], typer.Option(help="goodness (per-label goodness) or readout (a linear readout of the layers' activities: after a neutral-label pass, or the competitive loss's own).", rich_help_panel=_PANEL_TRAIN)] = None,
    readout_optimizer: Annotated[Optional[str], typer.Option(help="Optimizer of the linear readout: sgd or adam.", rich_help_panel=_PANEL_TRAIN)] = None,
    readout_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the linear readout.", rich_help_panel=_PANEL_TRAIN)] = None,
    skip_first: Annotated[Optional[bool], typer.Option("--skip-first/--no-skip-first", help="Leave the first layer out of the goodness sum.", rich_help_panel=_PANEL_TRAIN)] = None,
    score_last: Annotated[Optional[bool], typer.Option("--score-last/--score-all", help="Score labels with the last layer's goodness only (else the sum over layers).", rich_help_panel=_PANEL_TRAIN)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N epochs (0 = only at the end).", rich_help_panel=_PANEL_TRAIN)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialization, shuffling and negatives.", rich_help_panel=_PANEL_RUN)] = None,
    device: Annotated[Optional[str], typer.Option(help="Torch device: cpu, cuda, cuda:1, ...", envvar="FFPIPE_DEVICE", rich_help_panel=_PANEL_RUN)] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (0 = one per core).", envvar="FFPIPE_THREADS", rich_help_panel=_PANEL_RUN)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder for summary.json, metrics.jsonl and checkpoint.pt (default runs/latest).", envvar="FFPIPE_OUT", rich_help_panel=_PANEL_RUN)] = None,
    inprocess: Annotated[bool, typer.Option("--inprocess", help="Run every layer in this one process instead of one process per layer.", rich_help_panel=_PANEL_RUN)] = False,
    devices: Annotated[str, typer.Option(help="Pipeline: cpu, cuda (layer i on GPU i mod n) or one device per layer, e.g. cuda:0,cuda:1.", envvar="FFPIPE_DEVICES", rich_help_panel=_PANEL_PIPE)] = "cpu",
    config_file: Annotated[Optional[Path], typer.Option("--config", help="Start from this run's config.json instead of a preset (flags still override).", envvar="FFPIPE_CONFIG", rich_help_panel=_PANEL_PIPE)] = None,
    role: Annotated[Optional[str], typer.Option(help="Run one role of a pipeline: source, layer or sink (what each container runs).", envvar="FFPIPE_ROLE", rich_help_panel=_PANEL_PIPE)] = None,
    index: Annotated[Optional[int], typer.Option(help="With --role layer: which layer (0-based).", envvar="FFPIPE_INDEX", rich_help_panel=_PANEL_PIPE)] = None,
    source_addr: Annotated[str, typer.Option(help="host:port where the source receives beliefs.", envvar="FFPIPE_SOURCE_ADDR", rich_help_panel=_PANEL_PIPE)] = SOURCE_ADDR,
    layer_addrs: Annotated[Optional[str], typer.Option(help="host:port where each layer receives, comma-separated (default 127.0.0.1:5551, :5552, ...).", envvar="FFPIPE_LAYER_ADDRS", rich_help_panel=_PANEL_PIPE)] = None,
    sink_addr: Annotated[str, typer.Option(help="host:port where the sink receives.", envvar="FFPIPE_SINK_ADDR", rich_help_panel=_PANEL_PIPE)] = SINK_ADDR,
    keys: Annotated[Optional[Path], typer.Option(help="Encrypt and authenticate every link with the CURVE keys in this folder (`ffpipe keys DIR` makes them).", envvar="FFPIPE_KEYS", rich_help_panel=_PANEL_PIPE)] = None,
    pin: Annotated[bool, typer.Option("--pin", help="Pin layer i to core i mod n, the source and the sink to the core whose layers cost least; Linux.", rich_help_panel=_PANEL_PIPE)] = False,
    bind_host: Annotated[str, typer.Option(help="Interface a role binds its receiving socket on (0.0.0.0 in containers).", envvar="FFPIPE_BIND_HOST", rich_help_panel=_PANEL_PIPE)] = "127.0.0.1",
    resume: Annotated[Optional[Path], typer.Option(help="Continue the stopped run in this folder with its own config (in-process, flags such as --epochs still override; a pipeline resumes with the same epochs, batch size and seed).", rich_help_panel=_PANEL_RUN)] = None,
    restart: Annotated[str, typer.Option(help="Pipeline: no, or on-failure (a role that dies is started again from its checkpoint and the source resends what was lost).", envvar="FFPIPE_RESTART", rich_help_panel=_PANEL_PIPE)] = "no",
    max_restarts: Annotated[int, typer.Option(help="With --restart on-failure: restarts allowed per role.", rich_help_panel=_PANEL_PIPE)] = 3,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Pipeline: train batches between a layer's checkpoints (a crash loses and replays at most this many, and the few trained while one was written).", rich_help_panel=_PANEL_PIPE)] = None,
    retransmit_after: Annotated[Optional[float], typer.Option(help="Pipeline: seconds without progress after which the source resends what the sink has not confirmed.", rich_help_panel=_PANEL_PIPE)] = None,
    resume_role: Annotated[bool, typer.Option("--resume-role", hidden=True, help="Set by the launcher: this role continues from its checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", rich_help_panel=_PANEL_RUN)] = False,
) -> None:
    """Train a Forward-Forward network and evaluate it; writes a run folder."""
    from ffpipe import config, data as datasets, inprocess as trainer

    try:
        parsed_layers = _parse_layers(layers)
    except ValueError as e:
        raise _fail(str(e)) from None
    flags = dict(
        dataset=dataset, data_dir=str(data_dir) if data_dir else None, download=download, val_size=val_size,
        train_size=train_size, shift=shift, flip=flip, standardize=standardize, equalize=equalize, whiten=whiten, test_blur=test_blur, layers=parsed_layers, epochs=epochs, batch_size=batch_size, schedule=schedule, negatives=negatives,
        predict=predict, skip_first=skip_first, score_last=score_last, eval_every=eval_every, seed=seed, device=device, threads=threads,
        out=str(out) if out else None, checkpoint_every=checkpoint_every, retransmit_s=retransmit_after,
    )
    nested = dict(
        layer=dict(norm=norm, goodness=goodness, threshold=threshold, loss=loss, peer_norm=peer_norm),
        optim=dict(lr=lr, name=optimizer, schedule=lr_schedule, weight_decay=weight_decay),
        readout_optim=dict(lr=readout_lr, name=readout_optimizer),
    )
    try:
        if restart not in ("no", "on-failure"):
            raise ValueError(f"--restart must be no or on-failure; got {restart!r}")
        if role is None:  # otherwise ignored: refused, so that a mistyped --role is not a silent local run
            placed = [flag for flag, given in (("--index", index is not None), ("--source-addr", source_addr != SOURCE_ADDR),
                                               ("--layer-addrs", layer_addrs is not None), ("--sink-addr", sink_addr != SINK_ADDR)) if given]
            if placed:
                raise ValueError(f"{', '.join(placed)} place{'s' if len(placed) == 1 else ''} one role started with --role; "
                                 "ffpipe run without --role launches every role on loopback ports of its own")
        for flag, value, zero in (("--lr", lr, False), ("--readout-lr", readout_lr, False), ("--weight-decay", weight_decay, True)):
            if value is not None and not (math.isfinite(value) and (value > 0 or zero and value == 0)):  # the config's
                raise ValueError(f"{flag} must be {'>= 0' if zero else '> 0'}; got {value!r}")  # says only "lr"
        for flag, name in (("--optimizer", optimizer), ("--readout-optimizer", readout_optimizer)):
            if name is not None and name not in config.OPTIMIZERS:  # the config's own message cannot say which flag
                raise ValueError(f"{flag} must be {' or '.join(config.OPTIMIZERS)}; got {name!r}")
        if resume is not None:
            if config_file is not None:
                raise ValueError("--resume reads the run's own config; drop --config")
            config_file = resume / "config.json"
            if not config_file.is_file():
                raise CheckpointError(f"{resume}: no config.json there; is it an ffpipe run folder?")
            if out is not None and out.resolve() != resume.resolve():
                raise ValueError(f"--resume continues the run in {resume} itself; drop --out {out}")
            if inprocess and (resume / "run.json").is_file() and role is None:
                raise ValueError(f"{resume} is a pipelined run: resume it as one (without --inprocess)")
            flags["out"] = str(resume)
            inprocess = inprocess or not (resume / "run.json").is_file()
        if config_file is not None:
            base = _read_config(config_file)
            if preset is not None and preset != base.preset:
                raise ValueError(f"--preset {preset}: {config_file} was made with the {base.preset} preset and sets every field; "
                                 "drop --preset (flags still override single fields)")
            cfg = config.override_nested(config.apply(base, **flags), **nested)
            if resume is None and role is None and out is None and _holds_run(Path(cfg.out)) and \
                    Path(cfg.out).resolve() == config_file.resolve().parent:
                raise ValueError(f"--config {config_file} would write this run into {cfg.out}, over the run it came from; "
                                 f"give --out for the new run, or --resume {cfg.out} to continue that one")
            if resume is not None:  # refused here, before config.json is rewritten: a refused resume changes nothing
                _check_resume(base, cfg, pipeline=not inprocess)
                if not inprocess and role is None:
                    from ffpipe import checkpoint

                    # a corrupt checkpoint is named here, before any role starts (each role refuses it too, but the first
                    # role to die, which the launcher reports, could be another, stopped for another reason)
                    for path in sorted(resume.glob("layer*.pt")) + [resume / "sink.pt"]:
                        if path.is_file():
                            checkpoint.load(path, map_location="cpu")
                    if _finished(resume):
                        raise ValueError(f"{resume} finished all {base.epochs} epochs (its summary.json says so); nothing to resume")
        else:
            cfg = config.override_nested(config.preset(preset or "quick", **flags), **nested)  # validates every flag before loading data
        if not inprocess and role is None and device is not None and device != "cpu":
            raise ValueError(f"--device {device} places an --inprocess run; a pipeline places its layers with --devices")
        if inprocess and cfg.device.startswith("cuda") and role is None:
            import torch

            if not torch.cuda.is_available():  # before loading any data
                raise ValueError(f"--device {cfg.device}: no CUDA device is visible")
        if not inprocess or role is not None:
            from ffpipe.transport import queue_depth

            queue_depth()  # FFPIPE_HWM, checked once here rather than by the first role to make a socket
        if role is not None:
            _run_role(cfg, role, index, source_addr, layer_addrs, sink_addr, bind_host, quiet, resume_role, keys)
            return
        data = datasets.load(cfg.dataset, cfg.data_dir, download=cfg.download)
        if data.name != cfg.dataset and config_file is None:  # "auto" resolved: apply the preset's defaults for that dataset
            cfg = config.override_nested(config.preset(preset or "quick", **{**flags, "dataset": data.name}), **nested)
        elif data.name != cfg.dataset:
            cfg = config.apply(cfg, dataset=data.name)
        data = datasets.blur_test(datasets.hold_out(data, cfg.val_size, cfg.train_size), cfg.test_blur)
        if cfg.shift and 2 * cfg.shift >= min(data.shape[1:]):
            raise ValueError(f"--shift {cfg.shift}: {data.name}'s images are {data.shape[1]}x{data.shape[2]}; shift them by "
                             f"less than half that (at most {(min(data.shape[1:]) - 1) // 2})")
        if cfg.whiten and data.num_features > MAX_WHITENED:  # before any role starts, not in the source
            raise ValueError(f"--whiten takes at most {MAX_WHITENED:,} inputs (its matrix is D x D); {data.name} has {data.num_features:,}")
        if inprocess:
            from ffpipe import checkpoint

            state = checkpoint.load(resume) if resume is not None else None
            if state is not None:
                trainer.check_resumable(cfg, state)  # before config.json is written: a refused resume changes nothing
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            if resume is None:  # a pipeline run that used this folder before must not be resumed as one
                (Path(cfg.out) / "run.json").unlink(missing_ok=True)
            (Path(cfg.out) / "config.json").write_text(cfg.to_json())
            try:
                trainer.train(cfg, data, show_progress=not quiet, resume=state)
            except KeyboardInterrupt:
                saved = Path(cfg.out) / checkpoint.FILENAME  # saved after each evaluation and at least every 30 s
                if saved.is_file():
                    err.print(f"ffpipe: interrupted; epoch {checkpoint.load(saved)['epoch']} of {cfg.epochs} is saved: continue "
                              f"with ffpipe run --resume {cfg.out}")
                else:
                    err.print("ffpipe: interrupted before anything was saved; start the run again to train it")
                raise typer.Exit(130) from None
        else:
            from ffpipe import checkpoint, security
            from ffpipe.launcher import launch

            launch(cfg, data, devices=devices, threads=threads or 1, show_progress=not quiet, resume=resume is not None, pin=pin,
                   keys=security.load(keys) if keys else None, restart=restart, max_restarts=max_restarts)
    except (ValueError, DataError, CheckpointError, PipelineError, PeerTimeout, zmq.ZMQError, Diverged) as e:
        raise _fail(_flag_named(str(e))) from None
    except OSError as e:
        raise _fail(_os_error(e)) from None


def _holds_run(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("checkpoint.pt", "summary.json", "layer0.pt", "sink.pt"))


def _finished(run: Path) -> bool:
    """A pipelined run whose sink wrote the summary of a complete run (not an interrupted one)."""
    try:
        return json.loads((run / "summary.json").read_text()).get("interrupted") is False
    except (OSError, ValueError, AttributeError):
        return False


def _check_resume(saved, cfg, pipeline: bool) -> None:
    """A resumed run keeps what its checkpoints were made with: the dataset and the layers, and in a pipeline also
    what numbers its stream (the sink's STREAM_FIELDS). Flags that change them are refused, naming each."""
    from ffpipe.sink import READOUT_MADE_WITH, STREAM_FIELDS
    from ffpipe.worker import MADE_WITH

    changed = cfg.changed_from(saved, MADE_WITH + READOUT_MADE_WITH + (STREAM_FIELDS if pipeline else ()))
    if changed:
        was = ", ".join(f"{k}={json.dumps(v)}" for k, v in changed.items())
        raise ValueError(f"--resume continues the run as it was made ({was}); drop the flags that change "
                         + ("them" if len(changed) > 1 else "it") + ", or start a new run in another --out")


def _read_config(path: Path):
    from ffpipe.config import RunConfig

    try:
        return RunConfig.from_json(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read config ({e.strerror})") from e
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not an ffpipe config.json ({e})") from e


def _run_role(cfg, role, index, source_addr, layer_addrs, sink_addr, bind_host, quiet, resume, keys) -> None:
    """One role of a pipeline in this process (what `ffpipe run` starts per layer, and what containers run)."""
    from ffpipe import data as datasets, security
    from ffpipe.topology import Topology

    if layer_addrs is None:
        layer_addrs = ",".join(f"127.0.0.1:{5551 + i}" for i in range(len(cfg.layers)))
    topo = Topology.parse(source_addr, layer_addrs, sink_addr, bind_host, security.load(keys) if keys else None)
    if len(topo.layers) != len(cfg.layers):
        raise ValueError(f"--layer-addrs lists {len(topo.layers)} addresses for {len(cfg.layers)} layers")
    from ffpipe.launcher import die_with_launcher

    die_with_launcher()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    alone = False  # a layer or the sink stopped by a SIGTERM of its own, before the run's end
    if role == "source":
        from ffpipe.source import run_source

        data = datasets.hold_out(datasets.load(cfg.dataset, cfg.data_dir, download=cfg.download), cfg.val_size, cfg.train_size)
        run_source(cfg, datasets.blur_test(data, cfg.test_blur), topo, resume=resume, quiet=quiet)
    elif role == "layer":
        from ffpipe.worker import run_worker

        if index is None:
            raise ValueError("--role layer needs --index")
        alone = run_worker(cfg, index, topo, out, device=cfg.device, threads=cfg.threads or 1, resume=resume, quiet=quiet)
    elif role == "sink":
        from ffpipe.sink import run_sink

        alone = run_sink(cfg, topo, out, show_progress=not quiet, resume=resume)
    else:
        raise ValueError(f"--role must be source, layer or sink; got {role!r}")
    # The role's files are written and its sockets closed. Skip the interpreter's teardown, which takes seconds
    # with torch loaded (and more on a busy machine): a stopping pipeline should be gone at once.
    # A layer or sink that a SIGTERM of its own stopped mid-run exits STOPPED_ALONE (128 + SIGTERM, as if killed by
    # it), not 0: the run cannot finish without it, so a launcher or container runtime restarts it or stops the rest.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(STOPPED_ALONE if alone else 0)


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Option(help="Run folder (or checkpoint.pt) to evaluate.")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the datasets (default: the one the run used).", envvar="FFPIPE_DATA_DIR")] = None,
    split: Annotated[str, typer.Option(help="test, val or train.")] = "test",
    predict: Annotated[Optional[str], typer.Option(help="goodness, readout, or both (the product of the two's class probabilities; needs a trained readout). Default: the run's.")] = None,
    device: Annotated[str, typer.Option(help="Torch device.", envvar="FFPIPE_DEVICE")] = "cpu",
    confusion: Annotated[Optional[Path], typer.Option(help="Also draw the confusion matrix (per-class accuracy) to this PNG file.")] = None,
    test_blur: Annotated[Optional[float], typer.Option(help="Blur the test images with a Gaussian of this sigma (pixels) first; 0 = off (default: the run's --test-blur).")] = None,
    tta_flip: Annotated[bool, typer.Option("--tta-flip", help="Test-time augmentation: add each image's scores and its left-right mirror's (for data a flip keeps the label of, e.g. CIFAR-10, FER2013; not digits).")] = False,
) -> None:
    """Re-evaluate a saved model on a dataset split; print its accuracy, per-class accuracy and confusion matrix as JSON."""
    from ffpipe import data as datasets
    from ffpipe.model import evaluate
    from ffpipe.plots import confusion_matrix, per_class_accuracy, plot_confusion
    from ffpipe.serve import check_predict, load_model

    try:
        _assemble_if_roles_ran_apart(checkpoint, data_dir)
        net, meta = load_model(checkpoint, device)
        cfg = net.cfg
        check_predict(net, predict)
        if split not in ("test", "val", "train"):
            raise ValueError(f"--split must be test, val or train; got {split!r}")
        if test_blur is not None and not (test_blur >= 0 and math.isfinite(test_blur)):
            raise ValueError(f"--test-blur must be >= 0; got {test_blur!r}")
        loaded = datasets.load(meta["name"], data_dir or cfg.data_dir, download=cfg.download)
        data = datasets.blur_test(datasets.hold_out(loaded, cfg.val_size, cfg.train_size), cfg.test_blur if test_blur is None else test_blur)
        if list(data.shape) != list(meta["shape"]) or list(data.classes) != list(meta["classes"]):
            raise DataError(f"{data.name} from {data.source} holds {len(data.classes)} classes of {'x'.join(map(str, data.shape))} "
                            f"images; the model was trained on {len(meta['classes'])} classes of {'x'.join(map(str, meta['shape']))}")
        part = {"test": data.test, "val": data.val, "train": data.train}[split]  # train: the images it trained on
        if part is None:
            raise ValueError("this run held out no validation set (val_size 0)")
        if confusion is not None and confusion.is_dir():
            raise ValueError(f"--confusion {confusion} is a folder; give the PNG file to write, e.g. {confusion / 'confusion.png'}")
        if confusion is not None and not (confusion.parent.is_dir() and os.access(confusion.parent, os.W_OK)):
            raise ValueError(f"--confusion {confusion}: {confusion.parent} is not a folder this user can write to")
        result = evaluate(net, part.x, part.y, mode=predict, tta_flip=tta_flip)
        counts = confusion_matrix(result["predictions"], part.y, data.num_classes)
        if confusion is not None:
            title = f"{data.name} {split}, {','.join(map(str, cfg.layers))}: accuracy {100 * result['accuracy']:.2f}%"
            plot_confusion(counts, data.classes, title, confusion)
        typer.echo(json.dumps({"checkpoint": str(checkpoint), "dataset": data.name, "split": split,
                               **({"test_blur": cfg.test_blur if test_blur is None else test_blur} if split == "test" else {}),
                               "predict": predict or cfg.predict, "tta_flip": tta_flip, "samples": len(part), "accuracy": result["accuracy"],
                               "per_class": dict(zip(data.classes, per_class_accuracy(counts), strict=True)), "confusion": counts.tolist()}))
    except (ValueError, DataError, CheckpointError) as e:
        raise _fail(str(e)) from None
    except OSError as e:  # the confusion image or an assembled checkpoint that cannot be written
        raise _fail(_os_error(e)) from None


def _assemble_if_roles_ran_apart(run: Path, data_dir: Path | None) -> None:
    """A pipelined run whose roles ran apart (compose, Kubernetes, several hosts) has no launcher to assemble its
    checkpoint.pt: its layer checkpoints, readout and whitening are assembled here, once, the input statistics taken
    from its training images as the launcher takes them."""
    from ffpipe import checkpoint as ck, data as datasets
    from ffpipe.launcher import assemble_checkpoint

    if not run.is_dir() or (run / ck.FILENAME).is_file() or not (run / "layer0.pt").is_file():
        return
    if (run / "config.json").is_file():  # written by a launcher; roles started apart keep theirs in sink.pt
        cfg = _read_config(run / "config.json")
    elif (run / "sink.pt").is_file():
        from ffpipe.config import RunConfig

        cfg = RunConfig.from_json(ck.load(run / "sink.pt")["config"])
    else:
        raise CheckpointError(f"{run}: no {ck.FILENAME}, and neither config.json nor sink.pt to assemble one with")
    missing = [f"layer{i}.pt" for i in range(len(cfg.layers)) if not (run / f"layer{i}.pt").is_file()]
    if missing:
        raise CheckpointError(f"{run}: no {ck.FILENAME}, and no {', '.join(missing)} to assemble one from")
    data = datasets.hold_out(datasets.load(cfg.dataset, data_dir or cfg.data_dir, download=cfg.download), cfg.val_size, cfg.train_size)
    path = assemble_checkpoint(run, cfg, data)
    err.print(f"ffpipe: {run} had no {ck.FILENAME} (its roles ran apart); assembled {path} from its layer checkpoints")


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to classify (converted to the model's input size).")],
    checkpoint: Annotated[Path, typer.Option(help="Run folder (or checkpoint.pt) of a trained model.")],
    mode: Annotated[Optional[str], typer.Option("--predict", help="goodness, readout, or both (the product of the two's class probabilities; needs a trained readout). Default: the run's.")] = None,
    device: Annotated[str, typer.Option(help="Torch device.", envvar="FFPIPE_DEVICE")] = "cpu",
) -> None:
    """Classify image files with a trained model; prints one JSON line per image."""
    from ffpipe.serve import check_predict, classify_files, load_model

    try:
        if checkpoint.is_dir() and not (checkpoint / "checkpoint.pt").is_file() and (checkpoint / "layer0.pt").is_file():
            raise CheckpointError(f"{checkpoint}: no checkpoint.pt (its roles ran apart); ffpipe eval --checkpoint {checkpoint} "
                                  "assembles one from its layer checkpoints")
        net, meta = load_model(checkpoint, device)
        check_predict(net, mode)
        for row in classify_files(net, meta, images, mode):
            typer.echo(json.dumps(row))
    except (ValueError, DataError, CheckpointError) as e:
        raise _fail(str(e)) from None


@app.command()
def presets() -> None:
    """List the named presets and what each sets."""
    from ffpipe.config import PRESET_DATASET_DEFAULTS, PRESETS, RunConfig, preset as make

    base = RunConfig().to_dict()

    def sets(cfg: dict, against: dict) -> str:
        theirs = _flatten(against)
        return ", ".join(f"{k}={_shown(v)}" for k, v in _flatten(cfg).items() if k != "preset" and v != theirs.get(k)) or "nothing else"

    typer.echo("every preset starts from: " + ", ".join(f"{k}={_shown(v)}" for k, v in _flatten(base).items() if k != "preset"))
    for name in PRESETS:
        c = make(name).to_dict()
        typer.echo(f"\n{name}: {sets(c, base)}")
        for dataset in (d for p, d in PRESET_DATASET_DEFAULTS if p == name):
            typer.echo(f"  on {dataset}: {sets(make(name, dataset=dataset).to_dict(), {**c, 'dataset': dataset})}")
    typer.echo("\nflags given to ffpipe run override any of these")


def _flatten(d: dict) -> dict:
    """A config's dict with its nested ones spelled out: {"layer": {"norm": "rms"}} -> {"layer.norm": "rms"}."""
    return {f"{k}.{kk}" if isinstance(v, dict) else k: vv
            for k, v in d.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _parse_list(text: str | None, kind, name: str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(kind(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"{name}: expected a comma-separated list of numbers; got {text!r}") from None


@app.command()
def bench(
    dataset: Annotated[str, typer.Option(help="mnist, fashion-mnist, cifar10, fer2013, digits or synthetic.")] = "mnist",
    data_dir: Annotated[Path, typer.Option(help="Folder holding the datasets.", envvar="FFPIPE_DATA_DIR")] = Path("data"),
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Generated 28x28 images instead of --dataset: measures compute, not data loading.")] = False,
    layers: Annotated[str, typer.Option(help="Hidden layer widths; one pipeline stage per layer.")] = "1000,1000",
    batch_size: Annotated[int, typer.Option(help="Images per mini-batch (per micro-batch for bp-gpipe/bp-1f1b).")] = 256,
    variants: Annotated[str, typer.Option(help="Comma-separated: ff-inprocess, ff-pipeline, bp-inprocess, bp-gpipe, bp-1f1b.")] = ",".join(("ff-inprocess", "ff-pipeline", "bp-inprocess", "bp-gpipe", "bp-1f1b")),
    devices: Annotated[str, typer.Option(help="cpu or cuda (stages on GPU i mod n; NCCL for the backprop pipelines).", envvar="FFPIPE_DEVICES")] = "cpu",
    threads: Annotated[int, typer.Option(help="Torch threads in every process (pinned and stated).")] = 1,
    steps: Annotated[int, typer.Option(help="Mini-batches per throughput run (optimizer steps for bp-gpipe/bp-1f1b); the first 10% are warm-up.")] = 200,
    microbatches: Annotated[int, typer.Option("--microbatches", "-m", help="m, micro-batches per step of bp-gpipe and bp-1f1b.")] = 4,
    stages: Annotated[Optional[str], typer.Option(help="Also run every variant at these depths, e.g. 1,2,4 (the speedup curve).")] = None,
    in_flight: Annotated[Optional[str], typer.Option(help="Memory sweep, e.g. 1,4,16: ff-pipeline queue depth and bp-gpipe micro-batches; plus a 4x longer pipeline run.")] = None,
    to_accuracy: Annotated[Optional[str], typer.Option(help="Also time each variant to these test accuracies on the real data, e.g. 0.93,0.98.")] = None,
    max_epochs: Annotated[int, typer.Option(help="With --to-accuracy: epochs at most (FF runs the hinton recipe over this many).")] = 30,
    negatives: Annotated[str, typer.Option(help="FF negatives in the throughput runs: random (pure FF work) or hard.")] = "random",
    seed: Annotated[int, typer.Option(help="Seed of every run.")] = 0,
    pin: Annotated[bool, typer.Option("--pin", help="ff-pipeline: pin layer i to core i mod n, as ffpipe run --pin.")] = False,
    repeats: Annotated[int, typer.Option(help="Rounds of every throughput and ceiling run, interleaved (every other round reversed); bench.md adds each figure's median and range.")] = 1,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Keep each run's trained weights (*.pt) under OUT/runs; by default they are deleted once the run's figures are read.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds one throughput, memory or wire run may take before it is killed and reported as failed.")] = 900.0,
    accuracy_timeout: Annotated[float, typer.Option(help="The same for each --to-accuracy run.")] = 6 * 3600.0,
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md, the PNG plots and each run's log.")] = Path("bench"),
) -> None:
    """Throughput, memory and time-to-accuracy of FF (in-process, pipelined) against backprop (in-process, GPipe, 1F1B)."""
    import sys

    from ffpipe import data as datasets
    from ffpipe.bench import BenchOptions, bench as run_bench, check_data

    try:
        widths = _parse_layers(layers)
        if any(isinstance(w, str) for w in widths):
            raise ValueError("ffpipe bench compares fully connected nets with their backprop twins: give widths, e.g. 1000,1000")
        opts = BenchOptions(
            dataset="synthetic" if synthetic else dataset, data_dir=str(data_dir), layers=widths,
            batch_size=batch_size, variants=tuple(v.strip() for v in variants.split(",") if v.strip()), devices=devices,
            threads=threads, steps=steps, microbatches=microbatches, stages=_parse_list(stages, int, "--stages"),
            in_flight=_parse_list(in_flight, int, "--in-flight"), to_accuracy=_parse_list(to_accuracy, float, "--to-accuracy"),
            max_epochs=max_epochs, negatives=negatives, seed=seed, timeout_s=timeout, accuracy_timeout_s=accuracy_timeout, pin=pin, repeats=repeats,
            keep_checkpoints=keep_checkpoints, out=str(out),
        )
        if opts.devices == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--devices cuda: no CUDA device is visible")
        # one clear error before any run starts: missing data, or steps larger than it
        check_data(opts, len(datasets.load(opts.dataset, data_dir, download=False).train))
        result = run_bench(opts, command="ffpipe " + " ".join(sys.argv[1:]), echo=lambda s: err.print(s, highlight=False))
    except (ValueError, DataError) as e:
        raise _fail(str(e)) from None
    except OSError as e:  # --out that cannot be written (a file on the way, a full disk)
        raise _fail(_os_error(e)) from None
    if not all(r["ok"] for r in result["records"]):
        failed = [r for r in result["records"] if not r["ok"]]
        err.print(f"[yellow]ffpipe bench: {len(failed)} of {len(result['records'])} runs failed; see {out}/bench.md[/yellow]", highlight=False)
        raise typer.Exit(2)


@app.command()
def compose(
    layers: Annotated[int, typer.Option(help="Number of layer services, one container per layer (not widths: see --width).")],
    width: Annotated[int, typer.Option(help="Units in every layer.")] = 500,
    gpus: Annotated[Optional[str], typer.Option(help="GPU ids, e.g. 0,1,2,3: layer i reserves GPU i mod n and runs the CUDA image.")] = None,
    preset: Annotated[str, typer.Option(help="Named recipe every service trains with.")] = "quick",
    dataset: Annotated[str, typer.Option(help="Dataset, read from ./data (mounted read-only at /data).")] = "mnist",
    epochs: Annotated[Optional[int], typer.Option(help="Epochs unless FFPIPE_EPOCHS is set at `docker compose up` (default: the preset's).")] = None,
    out: Annotated[str, typer.Option(help="File to write, or - for stdout.")] = "docker-compose.yml",
) -> None:
    """Write a Docker Compose file: a source, one service per layer and a sink, finding each other by service name."""
    from ffpipe.compose import compose_file, dump

    try:
        text = dump(compose_file(layers, gpus=gpus.split(",") if gpus is not None else None, preset=preset,
                                 dataset=dataset, width=width, epochs=epochs))
        if out == "-":
            typer.echo(text, nl=False)
        else:
            Path(out).write_text(text)
    except ValueError as e:
        raise _fail(_flag_named(str(e))) from None
    except OSError as e:
        raise _fail(f"{out}: {e.strerror}") from None


@app.command()
def keys(
    folder: Annotated[Path, typer.Argument(help="Folder to write server.key(_secret) and client.key(_secret) into.")],
    force: Annotated[bool, typer.Option("--force", help="Replace existing keys.")] = False,
) -> None:
    """Create the CURVE key pairs that encrypt and authenticate a pipeline's links (`ffpipe run --keys FOLDER`)."""
    from ffpipe import security

    try:
        security.create(folder, force=force)
    except ValueError as e:
        raise _fail(str(e)) from None
    except OSError as e:
        raise _fail(f"{e.filename or folder}: {e.strerror}") from None
    typer.echo(f"wrote {folder}/server.key, server.key_secret, client.key, client.key_secret; copy the folder to every "
               f"host of the pipeline and start every role with --keys {folder}")
