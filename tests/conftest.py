import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FFPIPE_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed_and_threads(monkeypatch, tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    monkeypatch.setenv("FFPIPE_CACHE", str(tmp_path / "cache"))
    yield
    # a trainer run in this process flushes subnormal floats to zero (layer.set_compute); hypothesis, in later
    # tests, refuses to draw floats on a CPU set up that way
    torch.set_flush_denormal(False)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data: fails (never skips) under CI=true when it is missing."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        message = f"real-data test needs MNIST under {SHARED_DATA} (set FFPIPE_TEST_DATA to point elsewhere)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """An IDX file of unsigned bytes, as MNIST ships them."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_idx_dataset(folder: Path, n_train: int = 64, n_test: int = 32, compress: bool = False, seed: int = 0) -> tuple:
    """Tiny MNIST-format files: each class draws a bright bar at its own row, so the task is learnable."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(y):
            x[i, 4 + 2 * label, 4:24] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte", x, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, compress)
        out[split] = (x, y)
    return out
