"""The independent evaluator: accurate on real data, cached once, robust to a damaged cache."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from fedleak.data import load_dataset
from fedleak.metrics import accuracy
from fedleak.models import evaluator as ev
from fedleak.models.evaluator import EvaluatorNet, cache_dir, get_evaluator

# Enough to exercise the cache logic on faces (320 images) in about a second.
QUICK = {"epochs": 1, "batch_size": 64, "lr": 1e-3, "shift": 0, "flip": False}


@pytest.mark.parametrize(("channels", "size", "classes"), [(1, 32, 10), (1, 64, 40), (3, 32, 10)])
def test_net_adapts_to_every_dataset_shape(channels: int, size: int, classes: int) -> None:
    net = EvaluatorNet(channels, size, classes).eval()
    assert net(torch.zeros(4, channels, size, size)).shape == (4, classes)
    kinds = {type(m) for m in net.modules()}
    # Not the shared Hitaj CNN (tanh, no normalisation): a different judge.
    assert nn.Tanh not in kinds and {nn.BatchNorm2d, nn.ReLU} <= kinds


def test_net_rejects_unsupported_size() -> None:
    with pytest.raises(ValueError, match="power of two"):
        EvaluatorNet(1, 28, 10)


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("FEDLEAK_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("FEDLEAK_CACHE_DIR")
    assert cache_dir().parts[-2:] == (".cache", "fedleak")


def test_mnist_evaluator_is_accurate_and_cached(data_root) -> None:
    model, info = get_evaluator("mnist", root=data_root)
    assert not model.training
    assert info["dataset"] == "mnist" and info["arch_version"] == ev.ARCH_VERSION
    assert info["test_accuracy"] >= 0.98, info
    test = load_dataset("mnist", split="test", root=data_root)
    assert accuracy(model, test.images, test.labels) >= 0.98  # measured here, not just reported

    assert (cache_dir() / "evaluators" / "mnist-v1.pt").is_file()
    started = time.perf_counter()
    again, info2 = get_evaluator("mnist", root=data_root)
    assert time.perf_counter() - started < 5.0  # a load, not a training run
    assert info2 == info and not again.training
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture
def quick_faces(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("FEDLEAK_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(ev._RECIPES, "faces", QUICK)
    path = tmp_path / "evaluators" / "faces-v1.pt"
    path.parent.mkdir(parents=True)
    return path


@pytest.mark.parametrize("damage", ["garbage", "truncated", "old_arch"])
def test_damaged_cache_is_retrained(quick_faces, data_root, damage: str) -> None:
    path = quick_faces
    get_evaluator("faces", root=data_root)
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not a torch checkpoint")
    elif damage == "truncated":  # what a killed non-atomic writer would leave
        path.write_bytes(good[: len(good) // 2])
    else:
        blob = torch.load(path, weights_only=True)
        blob["info"]["arch_version"] = ev.ARCH_VERSION - 1
        torch.save(blob, path)

    model, info = get_evaluator("faces", root=data_root)
    assert not model.training and info["arch_version"] == ev.ARCH_VERSION
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 40)
    blob = torch.load(path, weights_only=True)  # rewritten, whole and readable
    assert blob["info"] == info
    assert list(path.parent.glob("*.tmp")) == []


def test_training_is_seeded_and_leaves_caller_state(quick_faces, data_root) -> None:
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    first, _ = get_evaluator("faces", root=data_root)
    second, _ = get_evaluator("faces", root=data_root, retrain=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_embed_is_the_layer_the_classifier_reads() -> None:
    torch.manual_seed(0)
    net = EvaluatorNet(1, 32, 10).eval()
    x = torch.randn(6, 1, 32, 32)
    features = net.embed(x)
    assert features.shape == (6, ev.FEATURE_DIM) and bool((features >= 0).all())  # after ReLU
    # Dropout is off in eval mode, so the class layer applied to the features is the forward.
    torch.testing.assert_close(net.classifier[-1](features), net(x))
