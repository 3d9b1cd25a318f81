"""Dataset loaders against the real offline copies (read-only) in the `data_root` fixture."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedleak.data import (
    DATASETS,
    ImageSet,
    data_root,
    image_shape,
    load_dataset,
    num_classes,
)
from fedleak.errors import ConfigError, DataError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
CIFAR_TRAIN_COUNTS = [412, 415, 378, 383, 419, 378, 387, 408, 419, 401]
CIFAR_TEST_COUNTS = [80, 66, 81, 78, 71, 75, 95, 78, 84, 92]


def _copy_mnist_test(src: Path, dst: Path) -> Path:
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        shutil.copy(src / "MNIST" / "raw" / f"t10k-{kind}-ubyte.gz", raw)
    return raw


@pytest.mark.parametrize(
    ("name", "split", "size", "n_labels"),
    [
        ("mnist", "train", 60000, 10),
        ("mnist", "test", 10000, 10),
        ("faces", "train", 320, 40),
        ("faces", "test", 80, 40),
        ("faces", "all", 400, 40),
        ("cifar10", "train", 4000, 10),
        ("cifar10", "test", 800, 10),
    ],
)
def test_shapes_dtypes_and_range(data_root, name, split, size, n_labels):
    ds = load_dataset(name, split, root=data_root)
    assert ds.name == name
    assert len(ds) == size
    assert tuple(ds.images.shape) == (size, *image_shape(name))
    assert ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    # The range must actually be used: a [0, 1] or 0..255 mapping would fail here.
    assert ds.images.min() < -0.9 and ds.images.max() > 0.8
    assert len(torch.unique(ds.labels)) == n_labels == num_classes(name) == len(ds.classes)


def test_mnist_labels_and_pixels(data_root):
    ds = load_dataset("mnist", "train", root=data_root)
    assert torch.bincount(ds.labels).tolist() == MNIST_TRAIN_COUNTS
    assert ds.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert ds.classes == tuple(str(i) for i in range(10))
    # Mean train pixel is 33.318/255; bilinear upscaling keeps the mean close to it.
    assert ds.images.mean().item() == pytest.approx(33.318 / 255 * 2 - 1, abs=2e-3)


def test_mnist_is_bilinear_upscale_of_raw_digits(data_root):
    with gzip.open(data_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(16 + 3 * 784)[16:], dtype=np.uint8).reshape(3, 1, 28, 28)
    expected = (
        F.interpolate(
            torch.from_numpy(raw.copy()).float(),
            size=(32, 32),
            mode="bilinear",
            align_corners=False,
        )
        / 255
        * 2
        - 1
    )
    ds = load_dataset("mnist", "test", root=data_root)
    assert ds.labels[:3].tolist() == [7, 2, 1]
    torch.testing.assert_close(ds.images[:3], expected, atol=1e-6, rtol=0)


def test_loads_are_cached_per_process(data_root):
    first = load_dataset("mnist", "test", root=data_root)
    assert load_dataset("mnist", "test", root=str(data_root)) is first


def test_unpacked_mnist_files_are_accepted(data_root, tmp_path):
    raw = _copy_mnist_test(data_root, tmp_path)
    for gz in raw.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    ds = load_dataset("mnist", "test", root=tmp_path)
    ref = load_dataset("mnist", "test", root=data_root)
    assert torch.equal(ds.labels, ref.labels)
    assert torch.equal(ds.images, ref.images)


def test_faces_split_per_person(data_root):
    train = load_dataset("faces", "train", root=data_root)
    test = load_dataset("faces", "test", root=data_root)
    every = load_dataset("faces", "all", root=data_root)
    assert train.classes == tuple(f"s{k}" for k in range(1, 41))
    assert torch.bincount(train.labels).tolist() == [8] * 40
    assert torch.bincount(test.labels).tolist() == [2] * 40
    assert every.labels.tolist() == np.repeat(np.arange(40), 10).tolist()
    shot = np.tile(np.arange(10), 40)
    assert torch.equal(train.images, every.images[torch.from_numpy(shot < 8)])
    assert torch.equal(test.images, every.images[torch.from_numpy(shot >= 8)])


def test_faces_fall_back_to_pgm_files(data_root, tmp_path):
    (tmp_path / "olivetti").mkdir()
    (tmp_path / "olivetti" / "att_faces").symlink_to(data_root / "olivetti" / "att_faces")
    ds = load_dataset("faces", "test", root=tmp_path)
    mat = load_dataset("faces", "test", root=data_root)
    assert tuple(ds.images.shape) == (80, 1, 64, 64)
    assert torch.equal(ds.labels, mat.labels)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert not torch.equal(ds.images, mat.images)  # really read from the PGMs


def test_cifar10_subset_counts_and_known_pixels(data_root):
    train = load_dataset("cifar10", "train", root=data_root)
    test = load_dataset("cifar10", "test", root=data_root)
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    assert torch.bincount(train.labels).tolist() == CIFAR_TRAIN_COUNTS
    assert torch.bincount(test.labels).tolist() == CIFAR_TEST_COUNTS

    def first_pixel(ds: ImageSet, label: int) -> list[int]:
        img = ds.of_classes([label]).images[0]  # files sorted: *_00000.png comes first
        return torch.round((img[:, 0, 0] + 1) / 2 * 255).int().tolist()

    assert first_pixel(test, 3) == [158, 112, 49]  # test_batch row 0, a cat
    assert first_pixel(train, 6) == [59, 62, 63]  # data_batch_1 row 0, a frog


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte.gz"),
        ("faces", "olivetti/olivettifaces.mat"),
        ("cifar10", "cifar-10-batches-py"),
    ],
)
def test_missing_root_names_the_path(tmp_path, name, expected):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset(name, "train", root=root)
    msg = str(err.value)
    assert str(root / expected) in msg
    assert "\n" not in msg
    assert "FEDLEAK_DATA_ROOT" in msg and "data.root" in msg


def test_unknown_name_and_split(data_root):
    with pytest.raises(ConfigError, match="mnist, faces, cifar10"):
        load_dataset("svhn", root=data_root)
    with pytest.raises(ConfigError, match="valid"):
        load_dataset("mnist", "validation", root=data_root)
    with pytest.raises(ConfigError):
        load_dataset("mnist", "all", root=data_root)  # only faces has "all"
    with pytest.raises(ConfigError):
        image_shape("svhn")
    with pytest.raises(ConfigError):
        num_classes("svhn")


def test_shape_and_class_tables():
    assert DATASETS == ("mnist", "faces", "cifar10")
    assert [image_shape(n) for n in DATASETS] == [(1, 32, 32), (1, 64, 64), (3, 32, 32)]
    assert [num_classes(n) for n in DATASETS] == [10, 40, 10]


def test_truncated_mnist_gz_is_a_data_error(data_root, tmp_path):
    raw = _copy_mnist_test(data_root, tmp_path)
    target = raw / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:100_000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test", root=tmp_path)


def test_bad_magic_and_short_payload_are_data_errors(data_root, tmp_path):
    raw = _copy_mnist_test(data_root, tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    good = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress((2051).to_bytes(4, "big") + good[4:]))
    with pytest.raises(DataError, match="magic 2051"):
        load_dataset("mnist", "test", root=tmp_path)
    labels.write_bytes(gzip.compress(good[:-5]))  # valid gzip, payload shorter than header says
    with pytest.raises(DataError, match="t10k-labels"):
        load_dataset("mnist", "test", root=tmp_path)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLEAK_DATA_ROOT", str(tmp_path / "env"))
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root("") == tmp_path / "env"
    assert data_root(None) == tmp_path / "env"
    monkeypatch.delenv("FEDLEAK_DATA_ROOT")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "fedleak" / "data"


def test_env_root_is_used_by_default(data_root):
    # conftest points FEDLEAK_DATA_ROOT at the shared data, so no root argument is needed.
    assert len(load_dataset("faces", "test")) == 80


def test_subset_and_of_classes(data_root):
    ds = load_dataset("mnist", "test", root=data_root)
    sub = ds.subset([2, 0, 1])
    assert sub.labels.tolist() == [1, 7, 2]
    assert torch.equal(sub.images[1], ds.images[0])
    assert sub.classes == ds.classes and sub.name == "mnist"
    sub.images.zero_()  # a copy: the cached set must not change
    assert ds.images[0].min() == -1.0 and ds.images[0].max() > 0.9

    picked = ds.of_classes([3, 8])
    counts = torch.bincount(ds.labels)
    assert len(picked) == counts[3] + counts[8]
    assert set(picked.labels.tolist()) == {3, 8}  # labels keep their global ids
    assert len(ds.of_classes([])) == 0
    assert len(ds.subset(np.arange(5))) == 5


def test_faces_cannot_be_downloaded(tmp_path):
    with pytest.raises(DataError, match="cannot be downloaded"):
        load_dataset("faces", root=tmp_path, download=True)


def test_mnist_download_uses_torchvision_then_our_parser(data_root, tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_mnist(root, train, download):
        calls.append((root, train, download))
        _copy_mnist_test(data_root, Path(root))

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    ds = load_dataset("mnist", "test", root=tmp_path, download=True)
    assert calls == [(str(tmp_path.resolve()), False, True)]
    assert len(ds) == 10000
    load_dataset("mnist", "test", root=tmp_path, download=True)
    assert len(calls) == 1  # files present now: no second download


def test_download_failures_become_data_errors(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: URLError")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="downloading mnist"):
        load_dataset("mnist", root=tmp_path, download=True)
    with pytest.raises(DataError, match="downloading cifar10"):
        load_dataset("cifar10", root=tmp_path, download=True)
