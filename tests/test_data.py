"""Every reader on small files generated here, in each format; clear errors for missing or corrupt data."""

import gzip
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_idx_dataset, write_idx
from ffpipe import data
from ffpipe.data import DataError


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_in_torchvision_layout(tmp_path, compress):
    made = make_idx_dataset(tmp_path / "MNIST" / "raw", compress=compress)
    d = data.load("mnist", tmp_path, download=False)
    assert d.shape == (1, 28, 28) and d.num_classes == 10
    assert len(d.train) == 64 and len(d.test) == 32
    assert torch.equal(d.train.x[:, 0], torch.from_numpy(made["train"][0].astype(np.uint8)))
    assert torch.equal(d.test.y, torch.from_numpy(made["t10k"][1]).long())


def test_fashion_mnist_flat_folder_like_debian(tmp_path):
    make_idx_dataset(tmp_path, compress=True)
    d = data.load("fashion-mnist", tmp_path, download=False)
    assert d.classes[0] == "T-shirt/top" and len(d.train) == 64


def test_validation_split_comes_from_the_end_of_train(tmp_path):
    made = make_idx_dataset(tmp_path / "MNIST" / "raw")
    d = data.load("mnist", tmp_path, download=False, val_size=16)
    assert len(d.train) == 48 and len(d.val) == 16 and len(d.test) == 32
    assert torch.equal(d.val.y, torch.from_numpy(made["train"][1][48:]).long())
    with pytest.raises(DataError, match="--val-size 64 must be smaller than the 64 training images"):
        data.load("mnist", tmp_path, download=False, val_size=64)


def test_validation_leaves_out_exact_copies_of_training_images(capsys):
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    x[7], x[9] = x[2], x[0]  # two of the last four are copies of training images
    d = data.Data("toy", data.Split(x, torch.arange(10)), data.Split(x[:2], torch.arange(2)), None, [str(i) for i in range(10)], "toy")
    held = data.hold_out(d, 4)
    assert held.train.y.tolist() == list(range(6)) and held.val.y.tolist() == [6, 8]
    assert "left 2 of the 4 validation images out" in capsys.readouterr().err
    assert data.hold_out(d, 2).val.y.tolist() == [8]
    assert "left 1 of the 2" in capsys.readouterr().err
    with pytest.raises(DataError, match="every one of the 1 validation images"):
        data.hold_out(d, 1)  # image 9 alone, a copy of image 0


def test_missing_mnist_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        data.load("mnist", tmp_path, download=False)


def test_corrupt_idx_is_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    make_idx_dataset(raw)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.load("mnist", tmp_path, download=False)
    (raw / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="magic"):
        data.load("mnist", tmp_path, download=False)
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((0, 28, 28)))  # a valid header of 0 images
    with pytest.raises(DataError, match="holding nothing"):
        data.load("mnist", tmp_path, download=False)
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        data.load("mnist", tmp_path, download=False)


def test_labels_out_of_range_are_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    make_idx_dataset(raw)
    write_idx(raw / "train-labels-idx1-ubyte", np.full(64, 12))
    with pytest.raises(DataError, match="labels"):
        data.load("mnist", tmp_path, download=False)


def test_download_failure_is_reported_not_hung_and_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    import torchvision

    (tmp_path / "MNIST" / "notes.txt").parent.mkdir()
    (tmp_path / "MNIST" / "notes.txt").write_text("the user's own file")

    def cut_off(self, *a, **k):  # as a dropped connection leaves it: the folders made, an archive half written
        raw = tmp_path / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08 half an archive")
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", cut_off)
    with pytest.raises(DataError, match="not found"):
        data.load("mnist", tmp_path, download=True)
    assert "could not download" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "MNIST").rglob("*")) == ["notes.txt"]  # the next load starts clean


def test_auto_falls_back_to_scikit_learn_digits(tmp_path, capsys):
    d = data.load("auto", tmp_path, download=False)
    assert d.name == "digits" and d.shape == (1, 8, 8)
    assert len(d.train) + len(d.test) == 1797 and len(d.test) == 360
    assert "digits" in capsys.readouterr().err


def _write_cifar_batches(root, n_per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n_per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": data.CIFAR10_CLASSES}, f)


def test_cifar10_official_batches_through_torchvision(tmp_path, monkeypatch):
    import torchvision

    _write_cifar_batches(tmp_path)
    # torchvision checks the official md5s; these generated batches cannot match them.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    d = data.load("cifar10", tmp_path, download=False)
    assert d.shape == (3, 32, 32) and len(d.train) == 30 and len(d.test) == 6
    assert d.classes == data.CIFAR10_CLASSES


def _write_image_folders(root, classes, mode, size, per_class=2):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_cifar10_image_folders_and_cache(tmp_path):
    _write_image_folders(tmp_path / "cifar10", data.CIFAR10_CLASSES, "RGB", 32)
    first = data.load("cifar10", tmp_path, download=False)
    assert first.shape == (3, 32, 32) and len(first.train) == 20
    # folders come class by class; the loader mixes them (a fixed shuffle), so a hold-out from the end has every class
    assert torch.equal(first.train.y.sort().values, torch.arange(10).repeat_interleave(2))
    assert len(set(first.train.y[-10:].tolist())) > 3
    for label, cls in enumerate(data.CIFAR10_CLASSES):  # every image still carries its folder's label
        image = torch.from_numpy(np.array(Image.open(tmp_path / "cifar10" / "train" / cls / "1.png"))).permute(2, 0, 1)
        assert first.train.y[(first.train.x == image).flatten(1).all(1)].tolist() == [label]
    assert list(data.cache_dir().glob("cifar10-*.pt"))
    again = data.load("cifar10", tmp_path, download=False)  # from the cache
    assert torch.equal(first.train.x, again.train.x)


def test_fer2013_folders_in_a_tar_archive_use_the_official_label_order(tmp_path):
    src = tmp_path / "src"
    # alphabetical folder order differs from FER2013's label order (neutral is 6, sad is 4)
    _write_image_folders(src / "fer2013", sorted(data.FER_CLASSES), "L", 48, per_class=1)
    with tarfile.open(tmp_path / "fer2013-jpg.tar.gz", "w:gz") as tar:
        tar.add(src / "fer2013", arcname="fer2013")
    d = data.load("fer2013", tmp_path, download=False)
    assert d.shape == (1, 48, 48) and len(d.train) == 7
    assert d.classes == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    for name in sorted(data.FER_CLASSES):  # labels follow FER2013's order, not the folders'
        image = torch.from_numpy(np.array(Image.open(src / "fer2013" / "train" / name / "0.png")))
        assert d.train.y[(d.train.x[:, 0] == image).flatten(1).all(1)].tolist() == [d.classes.index(name)]
    assert [p.name for p in data.cache_dir().glob("fer2013-jpg-*/fer2013/train")] == ["train"]


def test_an_archive_is_extracted_for_what_it_holds_and_a_truncated_one_is_refused_in_one_line(tmp_path):
    src = tmp_path / "src"
    _write_image_folders(src / "fer2013", sorted(data.FER_CLASSES), "L", 48, per_class=1)
    full, cut = tmp_path / "full", tmp_path / "cut"
    for folder in (full, cut):
        folder.mkdir()
        with tarfile.open(folder / "fer2013-jpg.tar.gz", "w:gz") as tar:
            tar.add(src / "fer2013", arcname="fer2013")
    assert len(data.load("fer2013", full, download=False).train) == 7  # extracted into the cache
    raw = (cut / "fer2013-jpg.tar.gz").read_bytes()
    (cut / "fer2013-jpg.tar.gz").write_bytes(raw[: len(raw) // 2])  # the same name, half the file
    with pytest.raises(data.DataError, match=r"fer2013-jpg.tar.gz: cannot extract, the archive is truncated or corrupt") as e:
        data.load("fer2013", cut, download=False)  # not the other archive's extracted images
    assert "\n" not in str(e.value)
    (cut / "fer2013-jpg.tar.gz").write_bytes(b"\x1f\x8b" + bytes(range(200)))  # gzip's magic, then noise
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.load("fer2013", cut, download=False)
    assert len(data.load("fer2013", full, download=False).train) == 7


def test_fer2013_kaggle_csv(tmp_path):
    rows = ["emotion,pixels,Usage"]
    for i, usage in enumerate(["Training"] * 5 + ["PublicTest"] * 3 + ["PrivateTest"] * 2):
        rows.append(f"{i % 7},{' '.join(str((i + j) % 256) for j in range(2304))},{usage}")
    (tmp_path / "fer2013").mkdir()
    (tmp_path / "fer2013" / "fer2013.csv").write_text("\n".join(rows) + "\n")
    d = data.load("fer2013", tmp_path, download=False)
    assert len(d.train) == 5 and len(d.test) == 3 and d.shape == (1, 48, 48)
    assert int(d.train.x[1, 0, 0, 0]) == 1


def test_fer2013_bad_csv_and_missing(tmp_path):
    with pytest.raises(DataError, match="Kaggle"):
        data.load("fer2013", tmp_path)
    (tmp_path / "fer2013").mkdir()
    (tmp_path / "fer2013" / "fer2013.csv").write_text("emotion,pixels,Usage\n3,1 2 3,Training\n")
    with pytest.raises(DataError, match="2304"):
        data.load("fer2013", tmp_path)


def test_corrupt_image_in_a_folder_is_named(tmp_path):
    _write_image_folders(tmp_path / "cifar10", data.CIFAR10_CLASSES, "RGB", 32, per_class=1)
    (tmp_path / "cifar10" / "train" / "cat" / "0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="0.png"):
        data.load("cifar10", tmp_path, download=False)


def test_read_idx_gzip_roundtrip(tmp_path):
    arr = np.arange(24).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", arr, compress=True)
    assert gzip.open(path).read(4) == b"\x00\x00\x08\x03"
    assert torch.equal(data.read_idx(path), torch.from_numpy(arr.astype(np.uint8)))


def test_augment_shifts_and_flips_each_image_on_its_own():
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros, so padding is visible
    gen = torch.Generator().manual_seed(0)
    assert data.augment(x, 0, False, gen) is x and torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())
    y = data.augment(x, 2, False, gen)
    assert y.shape == x.shape and y.dtype == torch.uint8
    seen = set()
    for a, b in zip(x, y, strict=True):  # each output is its input translated by some (dy, dx) in [-2, 2], zero-filled
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(b, torch.roll(torch.nn.functional.pad(a, (2, 2, 2, 2)), (dy, dx), (1, 2))[:, 2:-2, 2:-2])]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 5  # offsets differ between images
    f = data.augment(x, 0, True, gen)
    mirrored = [torch.equal(b, a.flip(2)) for a, b in zip(x, f, strict=True)]
    assert all(m or torch.equal(b, a) for m, a, b in zip(mirrored, x, f, strict=True)) and 10 < sum(mirrored) < 54


def _noise_images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Uniform noise: a flat power spectrum, so a blur shows at every frequency. (N, 1, H, W) uint8"""
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_blur_is_a_gaussian_of_the_given_sigma_and_zero_is_no_blur():
    x = _noise_images(4)
    assert data.blur(x, 0) is x
    y = data.blur(x, 2.0)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert y.float().std() < x.float().std() / 3  # noise averaged away
    impulse = torch.zeros(1, 1, 31, 31)  # float, so that rounding does not cut the kernel's tails
    impulse[0, 0, 15, 15] = 1.0
    spread = data.blur(impulse, 2.0)[0, 0].double()
    rows = torch.arange(31, dtype=torch.float64) - 15
    var = (spread.sum(1) * rows**2).sum() / spread.sum()  # the kernel's variance along one axis: sigma^2
    assert var.sqrt().item() == pytest.approx(2.0, abs=0.15)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_blur_sigma_recovers_a_known_blur_from_the_images_alone(sigma):
    sharp, other = _noise_images(300, seed=1), _noise_images(300, seed=2)  # different images, same statistics
    assert data.blur_sigma(data.blur(sharp, sigma), other) == pytest.approx(sigma, rel=0.12)
    assert data.blur_sigma(other, data.blur(sharp, sigma)) == 0.0  # the sharper set is not "blurred"
    assert data.blur_sigma(sharp, other) < 0.2


def test_blur_test_blurs_the_test_images_only():
    d = data.Data("toy", data.Split(_noise_images(8, 16), torch.zeros(8, dtype=torch.int64)),
                  data.Split(_noise_images(6, 16, seed=3), torch.ones(6, dtype=torch.int64)),
                  data.Split(_noise_images(4, 16, seed=4), torch.zeros(4, dtype=torch.int64)), ["a", "b"], "here")
    assert data.blur_test(d, 0) is d
    b = data.blur_test(d, 1.5)
    assert b.train is d.train and b.val is d.val and torch.equal(b.test.y, d.test.y)
    assert torch.equal(b.test.x, data.blur(d.test.x, 1.5)) and not torch.equal(b.test.x, d.test.x)
