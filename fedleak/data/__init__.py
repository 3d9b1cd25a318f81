"""Datasets (offline-first, tensors in [-1, 1]) and client partitioners."""

from fedleak.data.datasets import (
    DATASETS,
    ImageSet,
    data_root,
    image_shape,
    load_dataset,
    num_classes,
)
from fedleak.data.partition import by_labels, dirichlet, iid, parse_classes

__all__ = [
    "DATASETS",
    "ImageSet",
    "by_labels",
    "data_root",
    "dirichlet",
    "iid",
    "image_shape",
    "load_dataset",
    "num_classes",
    "parse_classes",
]
