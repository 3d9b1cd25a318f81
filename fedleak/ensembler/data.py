"""Who holds which images: the client's training set, the attacker's auxiliary set, the victims.

The victims (evaluation images) come from the test split, so no attacker image is ever a victim.
The auxiliary set is by default a disjoint part of the train split (same distribution, other
images); ``aux-overlap`` gives the attacker the client's training images, the paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedleak.data import load_dataset
from fedleak.data.augment import augment
from fedleak.errors import ConfigError
from fedleak.settings.ensembler import EnsemblerSettings


@dataclass(frozen=True)
class Split:
    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Splits:
    client: Split
    aux: Split
    victims: Split


def load_splits(cfg: EnsemblerSettings) -> Splits:
    data = cfg.data
    root = data.root or None
    train = load_dataset(data.dataset, "train", root)
    test = load_dataset(data.dataset, "test", root)
    need = data.client_train + (0 if data.aux_overlap else data.aux)
    if need > len(train) or data.aux > len(train) or data.eval > len(test):
        raise ConfigError(
            f"data: asked for {data.client_train} client + {data.aux} aux train images "
            f"(overlap={data.aux_overlap}) and {data.eval} test images; the dataset has "
            f"{len(train)} train and {len(test)} test"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    client = order[: data.client_train]
    start = 0 if data.aux_overlap else data.client_train
    aux = order[start : start + data.aux]
    # The test split is stored class by class: a seeded shuffle gives every class its share.
    victims = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
    victims = victims[: data.eval]
    return Splits(
        Split(train.images[client].clone(), train.labels[client].clone()),
        Split(train.images[aux].clone(), train.labels[aux].clone()),
        Split(test.images[victims].clone(), test.labels[victims].clone()),
    )


def batches(
    split: Split,
    batch_size: int,
    gen: torch.Generator,
    *,
    shuffle: bool = True,
    with_augment: bool = False,
):
    """(images, labels) minibatches; a trailing single image is dropped (BatchNorm needs two)."""
    order = torch.randperm(len(split), generator=gen) if shuffle else torch.arange(len(split))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if shuffle and len(idx) < 2:
            continue
        x = split.images[idx]
        yield (augment(x, gen) if with_augment else x), split.labels[idx]
