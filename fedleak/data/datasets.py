"""Offline-first loaders for the three image datasets the attacks are evaluated on.

Everything is returned as one in-memory tensor in [-1, 1] (the range of the GAN generator's
tanh output), so attackers and clients can compare real and generated images directly.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import shutil
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedleak.caches import cache_dir
from fedleak.errors import ConfigError, DataError

DATASETS: tuple[str, ...] = ("mnist", "faces", "cifar10")

_SHAPES = {"mnist": (1, 32, 32), "faces": (1, 64, 64), "cifar10": (3, 32, 32)}
_NUM_CLASSES = {"mnist": 10, "faces": 40, "cifar10": 10}
_SPLITS = {
    "mnist": ("train", "test"),
    "faces": ("train", "test", "all"),
    "cifar10": ("train", "test"),
}
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_FIX = "set the data root with config key `data.root` or env FEDLEAK_DATA_ROOT, or enable download"


@dataclass(frozen=True)
class ImageSet:
    """A labelled image tensor pair.

    Tensors returned by `load_dataset` are shared with the per-process cache: treat them as
    read-only (`subset`/`of_classes` return copies, so slicing first is always safe).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices) -> ImageSet:
        """Keep the given items; labels keep their global meaning so `classes` is unchanged."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageSet(self.images[idx], self.labels[idx], self.classes, self.name)

    def of_classes(self, classes: Iterable[int]) -> ImageSet:
        """Items whose label is in `classes`, without relabelling (attacks target global ids)."""
        wanted = torch.as_tensor(sorted({int(c) for c in classes}), dtype=torch.int64)
        return self.subset(torch.nonzero(torch.isin(self.labels, wanted)).flatten().numpy())


def data_root(configured: str | os.PathLike | None = None) -> Path:
    """Resolve where datasets live: explicit config, then FEDLEAK_DATA_ROOT, then user cache."""
    if configured is not None and str(configured) != "":
        return Path(configured).expanduser()
    env = os.environ.get("FEDLEAK_DATA_ROOT", "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedleak" / "data"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def image_shape(name: str) -> tuple[int, int, int]:
    """(C, H, W) so models can be built before (or without) loading any data."""
    _check_name(name)
    return _SHAPES[name]


def num_classes(name: str) -> int:
    """Number of labels, needed for the classifier head and the GAN's fake class."""
    _check_name(name)
    return _NUM_CLASSES[name]


def load_dataset(
    name: str, split: str = "train", root: str | os.PathLike | None = None, download: bool = False
) -> ImageSet:
    """Load a dataset split, cached per process because Flower re-creates clients per message."""
    _check_name(name)
    if split not in _SPLITS[name]:
        raise ConfigError(f"unknown split {split!r} for {name}; valid: {', '.join(_SPLITS[name])}")
    base = data_root(root).resolve()
    if download:
        _download(name, split, base)
    return _load_cached(name, split, str(base))


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, split: str, root: str) -> ImageSet:
    """Decoded once per machine: every ClientApp is a fresh process (Flower starts one per
    message), and decoding MNIST or 4,000 PNGs costs seconds each time. The decoded tensors are
    kept under ``cache_dir()/datasets``, keyed by the source files' names, sizes and times."""
    base = Path(root)
    key = _source_key(name, split, base)
    path = cache_dir() / "datasets" / f"{name}-{split}-{key}"
    cached = _read_decoded(path, name) if key else None
    if cached is not None:
        return cached
    data = _decode(name, split, base)
    if key:
        _write_decoded(path, data)
    return data


def _decode(name: str, split: str, base: Path) -> ImageSet:
    if name == "mnist":
        return _load_mnist(base, split)
    if name == "faces":
        return _load_faces(base, split)
    return _load_cifar10(base, split)


_DECODED_VERSION = "1"  # bump when a loader's output changes


def _source_key(name: str, split: str, base: Path) -> str:
    """A fingerprint of the files a split is decoded from ('' when there are none to trust)."""
    folders = {"mnist": [base / "MNIST"], "faces": [base / "olivetti"]}.get(name) or [
        base / "cifar-10-batches-py",
        base / "cifar10-subset" / split,
    ]
    digest = hashlib.sha256(f"{_DECODED_VERSION}:{name}:{split}:{base}".encode())
    found = False
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                st = path.stat()
                digest.update(f"{path.relative_to(base)}:{st.st_size}:{st.st_mtime_ns}".encode())
                found = True
    return digest.hexdigest()[:16] if found else ""


def _read_decoded(folder: Path, name: str) -> ImageSet | None:
    """The decoded split, memory-mapped copy-on-write: a participant that keeps only its own
    classes reads only their pages."""
    try:
        images = np.load(folder / "images.npy", mmap_mode="c")
        labels = np.load(folder / "labels.npy")
        classes = tuple((folder / "classes.txt").read_text("utf-8").split("\n"))
    except (OSError, ValueError):  # missing, torn or foreign: decode again
        return None
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes, name)


def _write_decoded(folder: Path, data: ImageSet) -> None:
    """Written into a temporary folder and renamed, so a reader sees all of it or none."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "images.npy", data.images.numpy())
        np.save(tmp / "labels.npy", data.labels.numpy())
        (tmp / "classes.txt").write_text("\n".join(data.classes), "utf-8")
        os.rename(tmp, folder)
    except OSError:  # a read-only cache, or another process won the race: costs time only
        shutil.rmtree(tmp, ignore_errors=True)


def _missing(path: Path) -> DataError:
    return DataError(f"dataset file not found: {path}; {_FIX}")


def _to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """Map 0..255 values to [-1, 1], in place for float input: MNIST train is 245 MB and each
    temporary would cost ~0.2 s. The clamp guards against interpolation rounding."""
    x = pixels.float()
    return x.div_(255.0).mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)


# --- MNIST -------------------------------------------------------------------------------------

_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _mnist_file(base: Path, split: str, kind: str) -> Path:
    """Prefer the unpacked file (faster), accept the .gz torchvision ships; error names the .gz."""
    stem = f"{_MNIST_PREFIX[split]}-{kind}-ubyte"
    raw = base / "MNIST" / "raw"
    if (raw / stem).is_file():
        return raw / stem
    gz = raw / f"{stem}.gz"
    if not gz.is_file():
        raise _missing(gz)
    return gz


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """Parse an IDX file; any truncation or corruption becomes a DataError naming the file."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataError(f"corrupt IDX file {path}: only {len(data)} bytes")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"corrupt IDX file {path}: magic {found}, expected {magic}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(
            f"corrupt IDX file {path}: {len(data) - header} payload bytes, header says {shape}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_mnist(base: Path, split: str) -> ImageSet:
    img_path = _mnist_file(base, split, "images-idx3")
    lbl_path = _mnist_file(base, split, "labels-idx1")
    images = _read_idx(img_path, 2051, 3)
    labels = _read_idx(lbl_path, 2049, 1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise DataError(
            f"MNIST files disagree: {img_path} has {images.shape}, "
            f"{lbl_path} has {labels.shape[0]} labels"
        )
    if labels.max(initial=0) > 9:
        raise DataError(f"corrupt MNIST labels in {lbl_path}: label {labels.max()} > 9")
    x = torch.from_numpy(images.copy()).unsqueeze(1).float()
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    return ImageSet(
        _to_unit_range(x),
        torch.from_numpy(labels.astype(np.int64)),
        tuple(str(i) for i in range(10)),
        "mnist",
    )


# --- AT&T / Olivetti faces ---------------------------------------------------------------------


def _faces_split(images: np.ndarray, split: str) -> ImageSet:
    """Images 1-8 of every person train, 9-10 test: all 40 identities appear in both."""
    labels = np.repeat(np.arange(40), 10)
    shot = np.tile(np.arange(10), 40)
    keep = {"train": shot < 8, "test": shot >= 8, "all": np.ones(400, dtype=bool)}[split]
    x = torch.from_numpy(np.ascontiguousarray(images[keep])).unsqueeze(1)
    return ImageSet(
        _to_unit_range(x),
        torch.from_numpy(labels[keep].astype(np.int64)),
        tuple(f"s{k}" for k in range(1, 41)),
        "faces",
    )


def _faces_from_mat(path: Path) -> np.ndarray:
    import scipy.io

    try:
        faces = scipy.io.loadmat(str(path))["faces"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if faces.shape != (4096, 400):
        raise DataError(f"unexpected array shape {faces.shape} in {path}, expected (4096, 400)")
    # Column-major 64x64 per face (MATLAB), hence the transposes (scikit-learn's convention).
    faces = faces.T.reshape(400, 64, 64).transpose(0, 2, 1)
    if np.issubdtype(faces.dtype, np.floating) and faces.max() <= 1.0:
        faces = faces * 255.0
    return faces.astype(np.float32)


def _faces_from_pgm(folder: Path) -> np.ndarray:
    from PIL import Image

    out = np.empty((400, 64, 64), dtype=np.float32)
    for person in range(40):
        for shot in range(10):
            path = folder / f"s{person + 1}" / f"{shot + 1}.pgm"
            if not path.is_file():
                raise _missing(path)
            try:
                with Image.open(path) as im:
                    small = im.convert("L").resize((64, 64), Image.Resampling.BILINEAR)
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc}") from exc
            out[person * 10 + shot] = np.asarray(small, dtype=np.float32)
    return out


def _load_faces(base: Path, split: str) -> ImageSet:
    mat = base / "olivetti" / "olivettifaces.mat"
    if mat.is_file():
        return _faces_split(_faces_from_mat(mat), split)
    pgm = base / "olivetti" / "att_faces"
    if pgm.is_dir():
        return _faces_split(_faces_from_pgm(pgm), split)
    raise DataError(
        f"dataset file not found: {mat} (nor {pgm}); set the data root with config "
        "key `data.root` or env FEDLEAK_DATA_ROOT (faces cannot be downloaded)"
    )


# --- CIFAR-10 ----------------------------------------------------------------------------------


def _load_cifar10(base: Path, split: str) -> ImageSet:
    if (base / "cifar-10-batches-py").is_dir():
        return _cifar10_torchvision(base, split)
    folder = base / "cifar10-subset" / split
    if not folder.is_dir():
        raise DataError(
            f"dataset file not found: {base / 'cifar-10-batches-py'} "
            f"(nor the PNG subset {folder}); {_FIX}"
        )
    return _cifar10_png(folder)


def _cifar10_torchvision(base: Path, split: str) -> ImageSet:
    from torchvision import datasets

    try:
        ds = datasets.CIFAR10(str(base), train=split == "train", download=False)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"cannot load CIFAR-10 from {base / 'cifar-10-batches-py'}: {exc}") from exc
    x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
    return ImageSet(
        _to_unit_range(x).contiguous(),
        torch.as_tensor(ds.targets, dtype=torch.int64),
        tuple(ds.classes),
        "cifar10",
    )


def _cifar10_png(folder: Path) -> ImageSet:
    from PIL import Image

    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(CIFAR10_CLASSES):
        cls_dir = folder / cls
        if not cls_dir.is_dir():
            raise _missing(cls_dir)
        for path in sorted(cls_dir.glob("*.png")):
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB"))
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc}") from exc
            if arr.shape != (32, 32, 3):
                raise DataError(f"unexpected image size {arr.shape} in {path}, expected 32x32 RGB")
            arrays.append(arr)
            labels.append(label)
    if not arrays:
        raise DataError(f"no PNG images under {folder}; {_FIX}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return ImageSet(
        _to_unit_range(x).contiguous(),
        torch.tensor(labels, dtype=torch.int64),
        CIFAR10_CLASSES,
        "cifar10",
    )


# --- downloads ---------------------------------------------------------------------------------


def _download(name: str, split: str, base: Path) -> None:
    """Fetch missing files with torchvision; parsing stays ours so offline and online agree."""
    if name == "faces":
        if (
            not (base / "olivetti" / "olivettifaces.mat").is_file()
            and not (base / "olivetti" / "att_faces").is_dir()
        ):
            raise DataError(
                f"faces cannot be downloaded (torchvision has no downloader for "
                f"AT&T faces); place olivettifaces.mat under {base / 'olivetti'}"
            )
        return
    if name == "cifar10":
        if (base / "cifar-10-batches-py").is_dir():
            return
    else:
        try:
            _mnist_file(base, split, "images-idx3")
            _mnist_file(base, split, "labels-idx1")
            return
        except DataError:
            pass
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.CIFAR10
    try:
        cls(str(base), train=split == "train", download=True)
    except Exception as exc:  # network errors surface as RuntimeError, URLError or OSError
        raise DataError(f"downloading {name} into {base} failed: {exc}") from exc
    _load_cached.cache_clear()  # an earlier load of this root may predate the new files
