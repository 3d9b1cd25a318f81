"""The leakage-study models build, give the right shapes, and the sigmoid swap is complete."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedleak.models.leakage import (
    INCEPTION_MIN_SIZE,
    LEAKAGE_MODELS,
    SigmoidLeNet,
    build_leakage_model,
)


def test_sigmoid_lenet_is_dlgs_architecture():
    net = SigmoidLeNet(num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 12, (5, 5), (2, 2), (2, 2)),
        (12, 12, (5, 5), (2, 2), (2, 2)),
        (12, 12, (5, 5), (1, 1), (2, 2)),
    ]
    assert sum(isinstance(m, nn.Sigmoid) for m in net.modules()) == 3
    assert net.fc.in_features == 768
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert SigmoidLeNet(40, in_channels=1, image_size=64)(torch.rand(1, 1, 64, 64)).shape == (1, 40)


def test_sigmoid_lenet_init_is_dlgs_uniform_and_seeded():
    torch.manual_seed(0)
    a = SigmoidLeNet()
    torch.manual_seed(0)
    b = SigmoidLeNet()
    torch.manual_seed(1)
    c = SigmoidLeNet()
    weights = torch.cat([p.flatten() for p in a.parameters()])
    assert weights.abs().max() <= 0.5 and weights.std() > 0.25  # U(-0.5, 0.5) has std 0.289
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.fc.weight, c.fc.weight)


@pytest.mark.parametrize("name", ["lenet", "resnet18", "densenet121"])
@pytest.mark.parametrize("channels", [1, 3])
def test_small_input_models_output_shape(name, channels):
    torch.manual_seed(0)
    model = build_leakage_model(name, num_classes=7, in_channels=channels, image_size=32)
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, channels, 32, 32)).shape == (2, 7)


def test_inception_v3_smallest_size_and_rejects_smaller():
    torch.manual_seed(0)
    model = build_leakage_model("inception_v3", 10, in_channels=1, image_size=INCEPTION_MIN_SIZE)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, INCEPTION_MIN_SIZE, INCEPTION_MIN_SIZE))
    assert out.shape == (1, 10)
    with pytest.raises(ValueError, match="at least 75"):
        build_leakage_model("inception_v3", 10, image_size=INCEPTION_MIN_SIZE - 1)


def test_deterministic_given_seed():
    torch.manual_seed(3)
    a = build_leakage_model("resnet18", 10)
    torch.manual_seed(3)
    b = build_leakage_model("resnet18", 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _forward_counting_relu(model: nn.Module, x: torch.Tensor, monkeypatch) -> int:
    """Run a forward pass and count every ReLU call, module or functional, in place or not."""
    calls = []
    for owner, name in [(F, "relu"), (torch, "relu"), (torch, "relu_")]:
        original = getattr(owner, name)

        def counting(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    model.eval()
    with torch.no_grad():
        model(x)
    monkeypatch.undo()
    return len(calls)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "inception_v3"])
def test_sigmoid_swap_leaves_no_relu(name, monkeypatch):
    size = INCEPTION_MIN_SIZE if name == "inception_v3" else 32
    x = torch.rand(1, 3, size, size)
    torch.manual_seed(0)
    plain = build_leakage_model(name, 10, image_size=size)
    assert _forward_counting_relu(plain, x, monkeypatch) > 0  # the probe does see ReLUs
    torch.manual_seed(0)
    swapped = build_leakage_model(name, 10, image_size=size, sigmoid=True)
    assert not any(isinstance(m, nn.ReLU) for m in swapped.modules())
    assert any(isinstance(m, nn.Sigmoid) for m in swapped.modules())
    assert _forward_counting_relu(swapped, x, monkeypatch) == 0


def test_unknown_model_name():
    assert set(LEAKAGE_MODELS) == {"lenet", "resnet18", "densenet121", "inception_v3"}
    with pytest.raises(ValueError, match="unknown leakage model"):
        build_leakage_model("vgg11", 10)
