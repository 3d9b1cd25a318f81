import pytest
import torch

from fedleak.errors import ConfigError
from fedleak.models import build_classifier, build_generator
from fedleak.models.hitaj import FacesCNN, MnistCNN, faces_generator, mnist_generator, sample_noise


def test_mnist_cnn_shapes_and_layers():
    model = MnistCNN()
    out = model(torch.zeros(5, 1, 32, 32))
    assert out.shape == (5, 11)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (5, 5)),
        (32, 64, (5, 5)),
    ]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(256, 200), (200, 11)]


def test_faces_cnn_shapes():
    model = FacesCNN()
    assert model(torch.zeros(3, 1, 64, 64)).shape == (3, 41)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 400), (400, 41)]


def test_generators_output_range_and_size():
    torch.manual_seed(0)
    g = mnist_generator()
    x = g(sample_noise(4))
    assert x.shape == (4, 1, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in g.modules()) == 4
    gf = faces_generator()
    assert gf(sample_noise(2)).shape == (2, 1, 64, 64)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in gf.modules()) == 5
    assert all(m.bias is None for m in gf.modules() if isinstance(m, torch.nn.ConvTranspose2d))


def test_generator_init_is_dcgan_normal():
    torch.manual_seed(0)
    w = mnist_generator().net[0].weight
    assert abs(w.mean().item()) < 0.002
    assert abs(w.std().item() - 0.02) < 0.002


def test_noise_is_uniform_on_unit_interval():
    z = sample_noise(1000)
    assert z.shape == (1000, 100)
    assert z.min() >= -1 and z.max() <= 1 and abs(z.mean().item()) < 0.02


def test_registry():
    assert build_classifier("hitaj-mnist", 11)(torch.zeros(1, 1, 32, 32)).shape == (1, 11)
    assert build_generator("hitaj-faces")(sample_noise(2)).shape == (2, 1, 64, 64)
    with pytest.raises(ConfigError, match="unknown model"):
        build_classifier("resnet-9000", 10)
