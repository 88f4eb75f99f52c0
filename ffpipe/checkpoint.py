"""Checkpoints: one file of tensors and plain values, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "ffpipe-checkpoint-1"
FILENAME = "checkpoint.pt"


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or not an ffpipe checkpoint."""


def save(path: Path, payload: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve(path: str | Path) -> Path:
    """Accept a run folder or the checkpoint file itself."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def load(path: str | Path, map_location: str = "cpu") -> dict:
    file = resolve(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no checkpoint there (expected a run folder holding {FILENAME}, or the file)")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything torch.load raises means "unreadable"
        raise CheckpointError(f"{file}: corrupt or unreadable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not an ffpipe checkpoint (format {FORMAT!r} expected)")
    return payload
