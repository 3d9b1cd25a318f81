"""EnsembleRunner: the vmapped N nets give what running them one by one gives."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from fedleak.models.ensembler import server_net
from fedleak.server import ensemble_runner
from fedleak.server.ensemble_runner import EnsembleRunner, default_mode, resolve_device


def random_nets(n: int, seed: int = 0) -> list[nn.Module]:
    """Random server nets with random batch-norm statistics, so eval mode is really tested."""
    torch.manual_seed(seed)
    nets = [server_net() for _ in range(n)]
    for net in nets:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return nets


@pytest.fixture(scope="module")
def nets() -> list[nn.Module]:
    return random_nets(2)


@pytest.fixture(scope="module")
def vmapped(nets) -> EnsembleRunner:
    return EnsembleRunner(nets, "cpu", mode="vmap")


@pytest.fixture(scope="module")
def looped(nets) -> EnsembleRunner:
    return EnsembleRunner(nets, "cpu", mode="loop")


def test_vmap_equals_loop(vmapped, looped):
    features = torch.randn(2, 64, 4, 4)
    assert (vmapped.mode, looped.mode) == ("vmap", "loop")
    out = vmapped.forward(features)
    assert out.shape == (2, 2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out, looped.forward(features), rtol=1e-4, atol=1e-5)
    # Eval mode: a sample's output does not depend on its batch.
    torch.testing.assert_close(vmapped(features[:1]), out[:, :1], rtol=1e-4, atol=1e-5)


def test_half_input_is_computed_in_float32(looped):
    features = torch.randn(1, 64, 4, 4).half()
    torch.testing.assert_close(looped(features), looped(features.float()))


def test_auto_falls_back_to_the_loop_when_nets_differ(monkeypatch):
    odd = [
        server_net(),
        nn.Sequential(nn.Conv2d(64, 512, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    ]
    with pytest.raises(RuntimeError, match="cannot vmap"):
        EnsembleRunner(odd, "cpu", mode="vmap")
    monkeypatch.setattr(ensemble_runner, "default_mode", lambda device: "vmap")  # as on a GPU
    runner = EnsembleRunner(odd, "cpu")
    assert runner.mode == "loop"
    assert runner(torch.randn(1, 64, 4, 4)).shape == (2, 1, 512)


def test_auto_mode_loops_on_the_cpu_and_vmaps_on_a_gpu(nets):
    assert EnsembleRunner(nets[:1], "cpu").mode == "loop"
    assert default_mode(torch.device("cuda")) == "vmap"


def test_concurrent_calls_do_not_mix_weights(vmapped, looped):
    # functional_call swaps weights into a module; each thread must get its own copy of it.
    inputs = [torch.randn(1, 64, 4, 4) for _ in range(4)]
    outputs: list[torch.Tensor | None] = [None] * len(inputs)

    def work(i: int) -> None:
        outputs[i] = vmapped(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One batch through the loop is the reference for all four.
    torch.testing.assert_close(
        torch.cat(outputs, 1), looped(torch.cat(inputs)), rtol=1e-4, atol=1e-5
    )


def test_rejects_bad_arguments(nets, looped):
    with pytest.raises(ValueError, match="at least one"):
        EnsembleRunner([], "cpu")
    with pytest.raises(ValueError, match="mode"):
        EnsembleRunner(nets, "cpu", mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="B x C x H x W"):
        looped(torch.randn(64, 4, 4))


def test_auto_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu(looped):
    features = torch.randn(2, 64, 4, 4)
    expected = looped(features)
    gpu = EnsembleRunner(random_nets(2), "cuda")  # same seed: the same weights as `looped`
    out = gpu(features)
    assert gpu.mode == "vmap" and out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-3, atol=1e-3)
