"""Checkpoints: one file of tensors and plain values, written atomically, loaded with weights_only=True.

The file is a plain `torch.save` dict: {"format", "sha256", **payload}. "sha256" is a digest of the payload's
content (see `digest`), so a flipped bit anywhere in a tensor, which torch.load itself does not notice, is
refused at load. Files of the previous format (no digest) still load.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
from pathlib import Path

import torch

FORMAT = "ffpipe-checkpoint-2"
FORMAT_V1 = "ffpipe-checkpoint-1"  # no digest; written before checksums, still loaded for old runs
FILENAME = "checkpoint.pt"
_META = ("format", "sha256")


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or not an ffpipe checkpoint."""


def digest(payload: dict) -> str:
    """SHA-256 of the content: dict keys sorted; tensors as dtype, shape and raw bytes (on the CPU, contiguous);
    plain values (None, bool, int, float, str, bytes) as type and repr; lists and tuples alike, element by element."""
    h = hashlib.sha256()
    _feed(h, payload)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor {t.dtype} {list(obj.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)}\n".encode())
        for key, value in sorted(obj.items(), key=lambda kv: _plain(kv[0])):
            h.update(_plain(key))
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"list {len(obj)}\n".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(_plain(obj))


def _plain(value) -> bytes:
    if value is not None and not isinstance(value, (bool, int, float, str, bytes, torch.dtype)):
        raise TypeError(f"checkpoints hold tensors, dicts, lists and plain values, not {type(value).__name__}")
    return f"{type(value).__name__} {value!r}\n".encode()


def save(path: Path, payload: dict) -> None:
    """Write to a temporary file of this process and thread in the same folder, fsync, rename, fsync the folder:
    a reader never sees half a file, two writers never share a temporary file, and the rename survives a crash."""
    assert not set(_META) & set(payload), f"{_META} are the checkpoint's own keys"
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_stale_temporaries(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "sha256": digest(payload), **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _drop_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of `path` that a process killed mid-write (SIGKILL, a lost machine) left behind:
    those whose writer's pid no longer runs here. A live writer's file, or one from a pid this host cannot judge
    (another container's), stays."""
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.*.*.tmp"):
        pid = tmp.name[len(path.name) + 1 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or no pid at all: not ours to judge
    return True


def snapshot(obj):
    """A copy of a payload that later in-place updates cannot reach: every tensor cloned, containers rebuilt.
    What a caller hands `BackgroundWriter` while it goes on training the very tensors it saves."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """`save` in a thread of its own, one checkpoint at a time, so that a training loop does not wait for the
    digest, the serialization and the fsync. `submit` waits for the previous write first; a write that failed
    is raised by the next `submit` or `wait`. The caller learns that a file is durable through `on_done`."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, payload: dict, on_done=None) -> None:
        """Write `payload` (a `snapshot`: nothing may change it from now on) to `path`; then call on_done()."""
        self.wait()

        def write():
            try:
                save(path, payload)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
                return
            if on_done is not None:
                on_done()

        self._thread = threading.Thread(target=write, name="checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the write in flight, if any, is on disk; raises its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _fsync_dir(folder: Path) -> None:
    """Best effort: not every OS or file system lets a folder be opened and fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve(path: str | Path) -> Path:
    """Accept a run folder or the checkpoint file itself."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def load(path: str | Path, map_location: str = "cpu") -> dict:
    file = resolve(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no checkpoint there (expected a run folder holding {FILENAME}, or the file)")
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {map_location!r} (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {map_location}: no CUDA device is visible")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything torch.load raises means "unreadable"
        # one line, and none of torch's advice (for a file weights_only refuses, it suggests weights_only=False)
        if type(e).__name__ == "UnpicklingError":  # weights_only refused what the file holds
            raise CheckpointError(f"{file}: corrupt, or not an ffpipe checkpoint (it holds something other than "
                                  "tensors and plain data, which is never unpickled)") from e
        first = (str(e).strip().splitlines() or [""])[0].split("  (Could this error message be improved?")[0]
        raise CheckpointError(f"{file}: corrupt or unreadable checkpoint ({type(e).__name__}: {first[:200]})") from e
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, FORMAT_V1):
        raise CheckpointError(f"{file}: not an ffpipe checkpoint (format {FORMAT!r} expected)")
    if payload["format"] == FORMAT:
        stored = payload.get("sha256")
        try:
            actual = digest({k: v for k, v in payload.items() if k not in _META})
        except TypeError as e:
            raise CheckpointError(f"{file}: corrupt checkpoint ({e})") from e
        if stored != actual:
            raise CheckpointError(f"{file}: checksum mismatch: the file is corrupt (sha256 {str(stored)[:16]}... "
                                  f"stored, {actual[:16]}... computed)")
    return payload
