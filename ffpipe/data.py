"""Datasets as in-memory uint8 tensors, read from the formats users have, with one clear error when missing.

| dataset        | formats read (under --data-dir)                                                   | download |
|----------------|-----------------------------------------------------------------------------------|----------|
| mnist          | IDX files (.gz or not) in MNIST/raw/ (torchvision's layout) or in the folder itself | torchvision |
| fashion-mnist  | the same, in FashionMNIST/raw/ or fashion-mnist/ (Debian's dataset-fashion-mnist)  | torchvision |
| cifar10        | official python batches (cifar-10-batches-py/), or cifar10/{train,test}/<class>/*  | torchvision |
|                | image folders, or cifar10-jpg.tar.gz holding them (extracted to the cache)        |          |
| fer2013        | fer2013/fer2013.csv (Kaggle/ICML CSV), or fer2013/{train,test}/<emotion>/* folders | no (Kaggle) |
|                | or fer2013-jpg.tar.gz holding them                                                |          |
| digits         | scikit-learn's bundled 8x8 digits (always available offline)                      | -        |

Decoded image folders are cached as tensors under $FFPIPE_CACHE (default ~/.cache/ffpipe).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import socket
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataError(Exception):
    """A dataset is missing, incomplete or corrupt. The message names the path and what was expected."""


def _note(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Data:
    name: str
    train: Split
    test: Split
    val: Split | None
    classes: list[str]
    source: str  # where it was read from, for the user and the run summary

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    @property
    def num_features(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path) -> torch.Tensor:
    """Read one IDX file of unsigned bytes (plain or .gz), validating its header against its length."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: truncated or corrupt IDX file (header says {dims}, file has {len(raw)} bytes)")
    if 0 in dims:
        raise DataError(f"{path}: an IDX file holding nothing (header says {dims})")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _load_idx_dataset(name: str, data_dir: Path, download: bool) -> Data:
    tv_name = "MNIST" if name == "mnist" else "FashionMNIST"
    folders = [data_dir / tv_name / "raw", data_dir, data_dir / name, data_dir / name.replace("-", "_")]
    if _find_idx(folders, _IDX_FILES["test"][1]) is None and download:
        _torchvision_download(tv_name, data_dir)
    splits = {}
    for split, stems in _IDX_FILES.items():
        paths = [_find_idx(folders, stem) for stem in stems]
        if None in paths:
            missing = stems[paths.index(None)]
            raise DataError(
                f"{name}: {missing}[.gz] not found in {data_dir / tv_name / 'raw'} or {data_dir}"
                + ("" if download else " (download disabled)")
            )
        x, y = read_idx(paths[0]), read_idx(paths[1])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{paths[0]}: expected N images of HxW and N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
        if int(y.max()) >= 10:
            raise DataError(f"{paths[1]}: labels must be 0..9, found {int(y.max())}")
        splits[split] = Split(x[:, None], y.long())
    source = str(paths[0].parent)
    return Data(name, splits["train"], splits["test"], None, MNIST_CLASSES if name == "mnist" else FASHION_CLASSES, source)


def _torchvision_download(tv_name: str, data_dir: Path) -> None:
    """The real download path, for users with internet. Failure is not an error here: the caller reports what is missing."""
    import torchvision

    cls = getattr(torchvision.datasets, tv_name)
    folder = data_dir / tv_name
    before = set(folder.rglob("*")) if folder.is_dir() else set()
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # a machine without internet fails fast instead of hanging
    try:
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - any download failure means "not available"; reported by the caller
        _note(f"ffpipe: could not download {tv_name} into {data_dir}: {type(e).__name__}: {str(e).splitlines()[0]}")
        _remove_new(folder, before)
    finally:
        socket.setdefaulttimeout(old)


def _remove_new(folder: Path, before: set[Path]) -> None:
    """What a failed download left in `folder` that was not there before it: half-written archives (which the next
    load would find and fail to read) and the empty folders torchvision made."""
    for path in sorted(set(folder.rglob("*")) - before if folder.is_dir() else (), reverse=True):  # files before folders
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        elif path.is_file():
            path.unlink()
    if not before and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


# ---------------------------------------------------------------- image folders and archives

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]  # the official label order
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def cache_dir() -> Path:
    return Path(os.environ.get("FFPIPE_CACHE", Path.home() / ".cache" / "ffpipe"))


def _read_image_folder(root: Path, classes: list[str], mode: str, size: int) -> Split:
    """root/<class>/<image files>, labels in the order of `classes` (not alphabetical)."""
    from PIL import Image

    xs, ys = [], []
    found = {d.name.lower(): d for d in root.iterdir() if d.is_dir()}
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(f"{root}: class folders {missing} not found (expected {classes})")
    for label, cls in enumerate(classes):
        files = sorted(p for p in found[cls].iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        for path in files:
            try:
                with Image.open(path) as im:
                    im = im.convert(mode)
                    if im.size != (size, size):
                        im = im.resize((size, size))
                    xs.append(np.asarray(im, dtype=np.uint8))
            except (OSError, Image.DecompressionBombError) as e:
                raise DataError(f"{path}: cannot decode image ({e})") from e
            ys.append(label)
    if not xs:
        raise DataError(f"{root}: no images found under the class folders")
    x = torch.from_numpy(np.stack(xs))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return Split(x.contiguous(), torch.tensor(ys, dtype=torch.long))


def _image_folder_dataset(name: str, data_dir: Path, folder: str, classes: list[str], mode: str, size: int) -> Data | None:
    """Read <data_dir>/<folder>/{train,test}/, extracting <data_dir>/<folder>-jpg.tar.gz into the cache first if needed."""
    root = data_dir / folder
    if not (root / "train").is_dir():
        archive = data_dir / f"{folder}-jpg.tar.gz"
        if not archive.is_file():
            return None
        root = _extract(archive) / folder
        if not (root / "train").is_dir():
            raise DataError(f"{archive}: expected {folder}/train/ and {folder}/test/ inside the archive")
    key = hashlib.sha256(f"{root.resolve()}|{mode}|{size}|{classes}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"{name}-{key}.pt"
    if cached.is_file():
        try:
            t = torch.load(cached, weights_only=True)
            train, test = Split(t["train_x"], t["train_y"]), Split(t["test_x"], t["test_y"])
            return Data(name, _mixed(train), _mixed(test), None, classes, str(root))
        except Exception:  # noqa: BLE001 - a bad cache file is rebuilt, never trusted
            cached.unlink(missing_ok=True)
    train = _read_image_folder(root / "train", classes, mode, size)
    test = _read_image_folder(root / "test", classes, mode, size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    torch.save({"train_x": train.x, "train_y": train.y, "test_x": test.x, "test_y": test.y}, tmp)
    os.replace(tmp, cached)
    return Data(name, _mixed(train), _mixed(test), None, classes, str(root))


def _mixed(split: Split) -> Split:
    """Folders list images class by class; a fixed shuffle (the same on every machine) mixes them, so that a
    validation hold-out from the end, or --train-size from the start, holds every class."""
    order = torch.randperm(len(split.y), generator=torch.Generator().manual_seed(0))
    return Split(split.x[order], split.y[order])


def _extract(archive: Path) -> Path:
    """Extract a tar.gz once into the cache (never next to the archive, which may be read-only)."""
    st = archive.stat()  # keyed by the archive's path, size and time: another file of the same name is extracted anew
    key = hashlib.sha256(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / f"{archive.name.removesuffix('.tar.gz')}-{key}"
    done = dest / ".complete"
    if not done.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # EOFError: a truncated archive
            shutil.rmtree(dest, ignore_errors=True)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DataError(f"{archive}: cannot extract, the archive is truncated or corrupt ({type(e).__name__}: {reason})") from e
        done.touch()
    return dest


def _load_cifar10(data_dir: Path, download: bool) -> Data:
    import torchvision

    def official(dl: bool) -> Data:
        sets = [torchvision.datasets.CIFAR10(str(data_dir), train=t, download=dl) for t in (True, False)]
        tr, te = (Split(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in sets)
        return Data("cifar10", tr, te, None, CIFAR10_CLASSES, str(data_dir / "cifar-10-batches-py"))

    if (data_dir / "cifar-10-batches-py").is_dir():
        try:
            return official(False)
        except RuntimeError as e:
            raise DataError(f"{data_dir / 'cifar-10-batches-py'}: corrupt or incomplete CIFAR-10 batches ({e})") from e
    folder = _image_folder_dataset("cifar10", data_dir, "cifar10", CIFAR10_CLASSES, "RGB", 32)
    if folder is not None:
        return folder
    if download:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            return official(True)
        except Exception as e:  # noqa: BLE001
            _note(f"ffpipe: could not download CIFAR-10 into {data_dir}: {type(e).__name__}: {str(e).splitlines()[0]}")
        finally:
            socket.setdefaulttimeout(old)
    raise DataError(
        f"cifar10: not found in {data_dir} (expected cifar-10-batches-py/, cifar10/{{train,test}}/<class>/ "
        "or cifar10-jpg.tar.gz)" + ("" if download else " (download disabled)")
    )


def _read_fer_csv(path: Path) -> tuple[Split, Split]:
    """The Kaggle fer2013.csv (emotion,pixels,Usage) or icml_face_data.csv (emotion, Usage, pixels)."""
    import csv

    rows = {"Training": ([], []), "PublicTest": ([], [])}
    try:
        with open(path, newline="") as f:
            for i, row in enumerate(csv.DictReader(f, skipinitialspace=True)):
                usage = row.get("Usage")
                if usage not in rows:
                    continue
                pixels = np.array(row["pixels"].split(), dtype=np.uint8)
                if pixels.size != 48 * 48:
                    raise DataError(f"{path}: row {i + 2} has {pixels.size} pixels, expected 2304 (48x48)")
                rows[usage][0].append(pixels.reshape(1, 48, 48))
                rows[usage][1].append(int(row["emotion"]))
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: not a FER2013 CSV with emotion, pixels and Usage columns ({e})") from e
    if not rows["Training"][0] or not rows["PublicTest"][0]:
        raise DataError(f"{path}: needs rows with Usage 'Training' and 'PublicTest'")
    tr, te = (Split(torch.from_numpy(np.stack(xs)), torch.tensor(ys)) for xs, ys in rows.values())
    return tr, te


def _load_fer2013(data_dir: Path) -> Data:
    for csv_path in (data_dir / "fer2013" / "fer2013.csv", data_dir / "fer2013" / "icml_face_data.csv", data_dir / "fer2013.csv"):
        if csv_path.is_file():
            tr, te = _read_fer_csv(csv_path)
            return Data("fer2013", tr, te, None, FER_CLASSES, str(csv_path))
    folder = _image_folder_dataset("fer2013", data_dir, "fer2013", FER_CLASSES, "L", 48)
    if folder is not None:
        return folder
    raise DataError(
        f"fer2013: not found in {data_dir} (expected fer2013/fer2013.csv, fer2013/{{train,test}}/<emotion>/ or "
        "fer2013-jpg.tar.gz; FER2013 cannot be downloaded automatically: get it from Kaggle)"
    )


def _load_digits() -> Data:
    """scikit-learn's 1,797 8x8 handwritten digits: ships inside the package, so it works offline."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.clip(np.round(d.images * 255 / 16), 0, 255).astype(np.uint8))[:, None]
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # a fixed split, independent of --seed
    test, train = perm[:360], perm[360:]
    return Data("digits", Split(x[train], y[train]), Split(x[test], y[test]), None, MNIST_CLASSES, "scikit-learn load_digits()")


# ---------------------------------------------------------------- entry point


def _load_synthetic() -> Data:
    """60,000 + 2,000 random 28x28 images around ten fixed class prototypes: learnable, instant, no files.
    For benchmarks that must measure compute, not data loading, and for machines without datasets."""
    gen = torch.Generator().manual_seed(0)
    protos = torch.randint(0, 256, (10, 1, 28, 28), generator=gen, dtype=torch.uint8)

    def split(n: int) -> Split:
        y = torch.randint(0, 10, (n,), generator=gen)
        noise = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
        keep = torch.rand(n, 1, 28, 28, generator=gen) < 0.7
        return Split(torch.where(keep, protos[y], noise), y)

    return Data("synthetic", split(60_000), split(2_000), None, [str(i) for i in range(10)], "generated (seed 0)")


def load(name: str, data_dir: str | Path, *, download: bool = True, val_size: int = 0) -> Data:
    """Load a dataset by name; "auto" means MNIST if present or downloadable, else scikit-learn's digits."""
    data_dir = Path(data_dir)
    if name == "auto":
        try:
            data = _load_idx_dataset("mnist", data_dir, download)
        except DataError as e:
            _note(f"ffpipe: MNIST unavailable ({e}); using scikit-learn's 8x8 digits instead")
            data = _load_digits()
    elif name in ("mnist", "fashion-mnist"):
        data = _load_idx_dataset(name, data_dir, download)
    elif name == "cifar10":
        data = _load_cifar10(data_dir, download)
    elif name == "fer2013":
        data = _load_fer2013(data_dir)
    elif name == "digits":
        data = _load_digits()
    elif name == "synthetic":
        data = _load_synthetic()
    else:
        raise DataError(f"unknown dataset {name!r}")
    return hold_out(data, val_size)


def _image_key(image: torch.Tensor) -> bytes:
    return hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest()


def hold_out(data: Data, val_size: int, train_size: int = 0) -> Data:
    """Move the last `val_size` training images into a validation split (deterministic, independent of the seed),
    less any that are exact copies of an image left for training, then keep only the first `train_size` of the
    rest for training (0 = all)."""
    if val_size >= len(data.train):
        raise DataError(f"--val-size {val_size} must be smaller than the {len(data.train):,} training images {data.name} has")
    n = len(data.train) - val_size
    tr = data.train
    if train_size > n:
        raise DataError(f"--train-size {train_size} is more than the {n:,} training images {data.name} has" + (" after the hold-out" if val_size else ""))
    if val_size:
        seen = {_image_key(x) for x in tr.x[:n]}
        keep = torch.tensor([_image_key(x) not in seen for x in tr.x[n:]], dtype=torch.bool)
        if not keep.any():
            raise DataError(f"every one of the {val_size} validation images is an exact copy of a training image; "
                            "take a larger --val-size")
        if not keep.all():  # FER2013 has them: a copy of a training image would flatter the validation score
            _note(f"{data.name}: left {int((~keep).sum())} of the {val_size} validation images out: they are exact "
                  "copies of training images")
        val = Split(tr.x[n:][keep], tr.y[n:][keep])
        data = Data(data.name, Split(tr.x[:n], tr.y[:n]), data.test, val, data.classes, data.source)
    if train_size:
        data = Data(data.name, Split(data.train.x[:train_size], data.train.y[:train_size]), data.test, data.val, data.classes, data.source)
    return data


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalization of uint8 images (B, C, H, W): every image spreads over the whole range."""
    from torchvision.transforms.v2.functional import equalize as tv_equalize

    return tv_equalize(images)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of uint8 images (B, C, H, W) with a standard deviation of `sigma` pixels (reflecting at the
    borders; the kernel spans 3 sigma either side, at most the image). sigma 0 returns the images as they are."""
    if not sigma:
        return images
    from torchvision.transforms.v2.functional import gaussian_blur

    reach = min(math.ceil(3 * sigma), (min(images.shape[-2:]) - 1) // 2)
    return gaussian_blur(images, kernel_size=[2 * reach + 1] * 2, sigma=[float(sigma)] * 2)


def blur_test(data: Data, sigma: float) -> Data:
    """The same data with its test images blurred (`--test-blur`): for a training set whose images were blurred
    and a test set whose images were not, such as FER2013's image-folder copy (see `blur_sigma`)."""
    if not sigma:
        return data
    return Data(data.name, data.train, Split(blur(data.test.x, sigma), data.test.y), data.val, data.classes, data.source)


def blur_sigma(blurred: torch.Tensor, sharp: torch.Tensor, floor: float = 0.01) -> float:
    """The sigma of the Gaussian blur that best turns `sharp` images into `blurred` ones, from their average power
    spectra alone (no labels): blurring multiplies the power at spatial frequency f (cycles per pixel) by
    exp(-4 pi^2 sigma^2 f^2). Fitted over the radial frequencies where the power ratio is above `floor` (below it,
    JPEG noise dominates). 0 when `blurred` is not blurrier. Images (N, C, H, W) of one size, uint8 or float."""

    def power(x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (H, W): mean power spectrum, windowed
        x = x.double()
        x = x - x.mean(dim=(-2, -1), keepdim=True)
        window = torch.outer(torch.hann_window(x.shape[-2], periodic=False, dtype=x.dtype),
                             torch.hann_window(x.shape[-1], periodic=False, dtype=x.dtype))
        return torch.fft.fft2(x * window).abs().square().mean(dim=(0, 1))

    h, w = sharp.shape[-2:]
    ratio = power(blurred) / power(sharp)
    f = torch.sqrt(torch.fft.fftfreq(h, dtype=torch.float64)[:, None] ** 2 + torch.fft.fftfreq(w, dtype=torch.float64)[None, :] ** 2)
    rings = torch.round(f * max(h, w)).long()  # radial bins of width 1/max(h, w)
    f2, logs = [], []
    for k in range(1, int(rings.max()) + 1):
        r = ratio[rings == k].mean()
        if r < floor:
            break
        f2.append((k / max(h, w)) ** 2)
        logs.append(-torch.log(r).item())
    f2, logs = torch.tensor(f2, dtype=torch.float64), torch.tensor(logs, dtype=torch.float64)
    if len(f2) == 0 or (f2 * logs).sum() <= 0:
        return 0.0
    return math.sqrt((f2 * logs).sum().item() / (4 * math.pi**2 * (f2 * f2).sum().item()))


def input_stats(data: Data, standardize: bool, equalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (mean, std) inputs are standardized with: the training set's (after equalization when
    that is on), or (0, 1) when off."""
    if standardize:
        return channel_stats(equalize(data.train.x) if equalized else data.train.x)
    c = data.shape[0]
    return torch.zeros(c), torch.ones(c)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]. (N, C, H, W) -> (C,), (C,)"""
    xf = x.float().div_(255)
    return xf.mean(dim=(0, 2, 3)), xf.std(dim=(0, 2, 3))


def batch_indices(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's mini-batches: a fresh permutation drawn from `gen`, cut into batches (the last may be short).

    The in-process trainer and the pipeline's source both draw through this, so the same seed gives both the
    same batches in the same order."""
    perm = torch.randperm(n, generator=gen)
    return list(perm.split(batch_size))


def augment(images: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random training-time augmentation of a uint8 batch, vectorized: each image is translated by up to
    `shift` pixels in each direction (zero fill) and, with `flip`, mirrored left-right with probability 1/2.

    Draws from `gen` only when an augmentation is on, so runs without one keep their random stream."""
    if not shift and not flip:
        return images
    b, _, h, w = images.shape
    if shift:
        padded = torch.nn.functional.pad(images, (shift, shift, shift, shift))
        dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
        images = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    if flip:
        mirror = mirror_draw(b, gen)
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images.contiguous()


def mirror_draw(b: int, gen: torch.Generator) -> torch.Tensor:
    """Which of `b` images `augment` mirrors: (B,) bool, one draw from `gen` (the source draws the same)."""
    return torch.rand(b, generator=gen) < 0.5
