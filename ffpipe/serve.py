"""Using a trained model: load it from a checkpoint, classify image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ffpipe import checkpoint
from ffpipe.config import RunConfig
from ffpipe.data import DataError, blur
from ffpipe.model import FFNet


def load_model(path: str | Path, device: str = "cpu") -> tuple[FFNet, dict]:
    """Rebuild the net from a checkpoint (weights_only=True); returns it in eval mode with the data metadata."""
    payload = checkpoint.load(path, map_location=device)
    if "model" not in payload and ("layer" in payload or "readout" in payload or "expected" in payload):
        raise checkpoint.CheckpointError(f"{checkpoint.resolve(path)} holds one role of a pipelined run, not a model: give the "
                                         f"run folder (or its {checkpoint.FILENAME})")
    try:
        cfg = RunConfig.from_json(payload["config"])
        meta = payload["data"]
        net = FFNet(tuple(meta["shape"]), len(meta["classes"]), cfg)
        net.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"{checkpoint.resolve(path)}: checkpoint does not match its config ({e})") from e
    return net.to(device).eval(), meta


PREDICT_MODES = ("goodness", "readout", "both")


def check_predict(net: FFNet, mode: str | None) -> None:
    """Refuse a --predict other than PREDICT_MODES (None: the run's own), and scoring by a readout that was never
    trained: its weights start at zero, and all-zero scores would name class 0 for every image."""
    if mode not in (None, *PREDICT_MODES):
        raise ValueError(f"--predict must be goodness, readout or both; got {mode!r}")
    if mode == "both" and not net.cfg.competitive:
        raise ValueError("--predict both needs a model trained with --loss competitive, whose class goodness is trained "
                         "as a softmax (other losses' goodness is no probability to multiply)")
    if (mode or net.cfg.predict) in ("readout", "both") and not bool(net.readout.weight.any()):
        raise ValueError("this model's linear readout was never trained (its run did not use one; every weight is 0): "
                         "score it with --predict goodness")


def read_image(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file as the model's uint8 input: converted to its channels and resized. -> (C, H, W)"""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB").resize((w, h))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:  # the last: far too many pixels
        raise DataError(f"{path}: cannot read image ({e})") from e
    t = torch.from_numpy(arr.copy())
    return t[None] if c == 1 else t.permute(2, 0, 1)


def classify_files(net: FFNet, meta: dict, paths: list[Path], mode: str | None = None) -> list[dict]:
    images = blur(torch.stack([read_image(p, tuple(meta["shape"])) for p in paths]), net.cfg.test_blur)
    scores = net.scores(net.inputs(images), mode)
    rows = []
    for path, s in zip(paths, scores, strict=True):
        label = int(s.argmax())
        rows.append({"image": str(path), "label": label, "class": meta["classes"][label], "scores": [round(float(v), 4) for v in s]})
    return rows
