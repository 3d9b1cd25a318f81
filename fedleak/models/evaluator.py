"""An independent judge of generated images: a classifier the attacker never sees.

It is deliberately a different architecture from the shared Hitaj CNN (tanh, 5x5 convolutions):
small VGG-style blocks of 3x3 convolution + BatchNorm + ReLU + max-pool. Sharing the architecture
would let an attack that merely exploits the shared model's decision boundaries score well here too.

Trained once per dataset on the full train split and cached under ``cache_dir()/evaluators``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedleak.caches import cache_dir
from fedleak.runfolder import atomic_torch_save

__all__ = ["EvaluatorNet", "cache_dir", "get_evaluator", "is_cached"]

ARCH_VERSION = 1
SEED = 1234
FEATURE_DIM = 128  # width of the penultimate layer that ``EvaluatorNet.embed`` returns

# Per dataset: epochs, batch size, Adam learning rate, augmentation (random shift, mirror).
# MNIST: one epoch with per-step cosine decay reaches ~99.2% test accuracy. Faces have only 8
# images per person, so they need many epochs and jitter to generalise (25 epochs: ~98.8% on the
# 80 test faces); the CIFAR-10 subset (4,000 images) tops out near 60% at this size.
_RECIPES: dict[str, dict] = {
    "mnist": {"epochs": 1, "batch_size": 128, "lr": 2e-3, "shift": 0, "flip": False},
    "faces": {"epochs": 25, "batch_size": 32, "lr": 3e-3, "shift": 4, "flip": True},
    "cifar10": {"epochs": 10, "batch_size": 64, "lr": 2e-3, "shift": 3, "flip": True},
}
_DEFAULT_RECIPE = {"epochs": 10, "batch_size": 64, "lr": 2e-3, "shift": 2, "flip": False}


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]


class EvaluatorNet(nn.Module):
    """VGG-ish classifier; halves the image until it is 4x4, so 32x32 and 64x64 both work."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        widths = [16, 32, 64]
        size = image_size // 8
        while size > 4:  # 64x64 gets a fourth block rather than a huge flatten
            widths.append(64)
            size //= 2
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in widths:
            layers += _block(cin, cout)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * size * size, FEATURE_DIM),
            nn.BatchNorm1d(FEATURE_DIM),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(FEATURE_DIM, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer (after ReLU, before dropout and the class layer): the feature
        space in which the realism score compares generated and real images."""
        return self.classifier[:4](self.features(x))


def is_cached(dataset: str) -> bool:
    """Whether an evaluator for ``dataset`` is already trained and cached."""
    return _cache_path(dataset).is_file()


def _cache_path(dataset: str) -> Path:
    return cache_dir() / "evaluators" / f"{dataset}-v{ARCH_VERSION}.pt"


def _augment(x: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    if flip:
        mask = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    if shift:
        # Random translation per image: pad with the background value -1, crop a shifted window.
        n, _, h, w = x.shape
        padded = F.pad(x, (shift,) * 4, value=-1.0)
        off = torch.randint(0, 2 * shift + 1, (2, n), generator=gen)
        rows = (off[0][:, None] + torch.arange(h))[:, None, :, None]
        cols = (off[1][:, None] + torch.arange(w))[:, None, None, :]
        x = padded[
            torch.arange(n)[:, None, None, None],
            torch.arange(x.shape[1])[:, None, None],
            rows,
            cols,
        ]
    return x


def _train(model: EvaluatorNet, images: torch.Tensor, labels: torch.Tensor, recipe: dict) -> None:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    bs = recipe["batch_size"]
    steps = recipe["epochs"] * -(-len(labels) // bs)
    # Cosine decay per step: the last batches fine-tune at a small rate, worth ~0.2-0.5% accuracy.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                continue
            x = _augment(images[idx], recipe["shift"], recipe["flip"], gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _load_cached(path: Path, dataset: str) -> tuple[EvaluatorNet, dict] | None:
    """The cached model, or None when missing, unreadable or from another architecture."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        info = dict(blob["info"])
        if info.get("arch_version") != ARCH_VERSION or info.get("dataset") != dataset:
            return None
        model = EvaluatorNet(**blob["config"])
        model.load_state_dict(blob["state_dict"])
    except Exception:  # any damage to the cache (truncated, garbage, old keys) means retrain
        return None
    return model.eval(), info


def get_evaluator(
    dataset: str, root: str | Path | None = None, *, retrain: bool = False
) -> tuple[EvaluatorNet, dict]:
    """The trained evaluator for ``dataset`` (eval mode) and its info dict, training on first use.

    info: ``dataset``, ``test_accuracy`` (on the test split), ``arch_version``,
    ``trained_seconds``.
    """
    path = _cache_path(dataset)
    if not retrain:
        cached = _load_cached(path, dataset)
        if cached is not None:
            return cached

    from fedleak.data import load_dataset  # imported late: the cache hit needs no data code
    from fedleak.metrics.classification import accuracy

    train = load_dataset(dataset, split="train", root=root)
    test = load_dataset(dataset, split="test", root=root)
    images = torch.as_tensor(train.images, dtype=torch.float32)
    labels = torch.as_tensor(train.labels, dtype=torch.int64)
    config = {
        "in_channels": int(images.shape[1]),
        "image_size": int(images.shape[-1]),
        "num_classes": len(train.classes),
    }
    recipe = _RECIPES.get(dataset, _DEFAULT_RECIPE)

    # fork_rng: a fixed seed for reproducible weights without resetting the caller's RNG.
    # One thread: these small convolutions gain little from intra-op parallelism, and on a busy
    # 2-core machine OpenMP's spinning made 2-thread training 10x slower (342 s vs 37 s, MNIST).
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        torch.set_num_threads(1)
        try:
            model = EvaluatorNet(**config)
            started = time.perf_counter()
            _train(model, images, labels, recipe)
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(threads)

    info = {
        "dataset": dataset,
        "test_accuracy": accuracy(model, test.images, test.labels),
        "arch_version": ARCH_VERSION,
        "trained_seconds": round(seconds, 2),
    }
    atomic_torch_save({"state_dict": model.state_dict(), "config": config, "info": info}, path)
    return model, info
