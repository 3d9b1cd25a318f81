"""The leakage-study models build, give the right shapes, and the sigmoid swap is complete."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedleak.models.leakage import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LEAKAGE_MODELS,
    InputTransform,
    SigmoidLeNet,
    build_leakage_model,
)
from fedleak.models.torchvision_nets import INCEPTION_MIN_SIZE


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


# --- one input convention ---------------------------------------------------------------------


def test_dlg_lenet_takes_the_papers_unit_range():
    """The federation's dlg-lenet is DLG's LeNet fed [0, 1]: the [-1, 1] pipeline image x gives
    exactly the bare network's output on (x + 1) / 2, and not its output on x."""
    from fedleak.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("dlg-lenet", 10)
    bare = model[1]
    assert isinstance(model[0], InputTransform) and isinstance(bare, SigmoidLeNet)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(model(x), bare((x + 1) / 2))
    assert not torch.allclose(model(x), bare(x), atol=1e-3)


def test_study_and_federation_give_identical_gradients(data_root):
    """The dlg-models study's LeNet and the federation's dlg-lenet, same weights, same real
    CIFAR-10 image: the same FedSGD update, bit for bit."""
    from fedleak.attacker.inversion import fedsgd_update
    from fedleak.data import load_dataset
    from fedleak.models import build_classifier
    from fedleak.settings import load_study
    from fedleak.studies.dlg_models import build_model, model_settings

    cfg = load_study("dlg-models").to_toml_dict()
    settings = model_settings(cfg, "lenet")
    assert settings["input"] == "unit"
    torch.manual_seed(0)
    study = build_model("lenet", settings, cfg["models"]["sigmoid"], channels=3)
    torch.manual_seed(1)
    federation = build_classifier("dlg-lenet", 10)
    federation.load_state_dict(study.state_dict())  # strict: the same parameter names
    cifar = load_dataset("cifar10", "test", data_root)
    x, y = cifar.images[5:6], cifar.labels[5:6]
    a, b = fedsgd_update(study, x, y), fedsgd_update(federation, x, y)
    assert all(torch.equal(u, v) for u, v in zip(a.update, b.update, strict=True))
    # ... and the paper's model on the paper's [0, 1] image.
    paper = SigmoidLeNet(10)
    paper.load_state_dict(study[1].state_dict())
    c = fedsgd_update(paper, (x + 1) / 2, y)
    assert all(torch.equal(u, v) for u, v in zip(a.update, c.update, strict=True))


def test_input_transforms():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert torch.equal(InputTransform("raw")(x), x)
    assert torch.equal(InputTransform("unit")(x).flatten(), torch.tensor([0.0, 0.5, 1.0]))
    imagenet = InputTransform("imagenet")(x).flatten()
    expected = (torch.tensor([0.0, 0.5, 1.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.allclose(imagenet, expected)
    assert InputTransform("unit").state_dict() == {}  # nothing to ship in a federation
    with pytest.raises(ValueError, match="unknown input transform"):
        InputTransform("zscore")
    with pytest.raises(ValueError, match="unknown input transform"):
        build_leakage_model("lenet", 10, input="zscore")
