"""Run the N Ensembler server nets on one feature batch: N x B x 512 out.

The nets share an architecture, so their weights are stacked once (``torch.func.
stack_module_state``) and one ``vmap``-ed ``functional_call`` runs all of them: one kernel per
layer instead of N, which is where a GPU wins. On the CPU vmap turns every convolution after
the first into a grouped convolution, which oneDNN runs slower than N plain ones
(benchmarks/ensembler_latency.py: vmap/loop = 1.2 at N=10, B=32, one thread), so ``"auto"``
loops there. The loop is also the fallback and the reference the tests compare against. The
nets run in eval mode: batch norm uses its running statistics, so a sample's output does not
depend on the rest of its batch.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

Mode = Literal["auto", "vmap", "loop"]


def default_mode(device: torch.device) -> Literal["vmap", "loop"]:
    """What ``mode="auto"`` tries first on ``device``."""
    return "loop" if device.type == "cpu" else "vmap"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class EnsembleRunner:
    """Forward a feature batch through every net; safe to call from several threads at once.

    ``nets`` are moved to ``device`` and switched to eval mode. ``mode="auto"`` uses
    ``default_mode(device)`` and falls back to the loop when the nets cannot be vmapped
    (differing architectures, an op without a batching rule); ``"vmap"`` raises instead.
    """

    def __init__(
        self, nets: Sequence[nn.Module], device: str | torch.device = "auto", *, mode: Mode = "auto"
    ) -> None:
        if not nets:
            raise ValueError("EnsembleRunner needs at least one net")
        if mode not in ("auto", "vmap", "loop"):
            raise ValueError(f"mode must be auto, vmap or loop, got {mode!r}")
        self.device = resolve_device(device)
        self.num_nets = len(nets)
        self._nets = [net.to(self.device).eval() for net in nets]
        self._local = threading.local()
        self.mode: Literal["vmap", "loop"] = "loop"
        if mode == "vmap" or (mode == "auto" and default_mode(self.device) == "vmap"):
            try:
                self._stack()
                self.mode = "vmap"
            except Exception as err:
                if mode == "vmap":
                    raise RuntimeError(f"cannot vmap these nets: {err!r}") from err

    def _stack(self) -> None:
        with torch.no_grad():
            params, buffers = stack_module_state(self._nets)
        self._params = {k: v.detach() for k, v in params.items()}
        self._buffers = buffers
        # A weightless copy: functional_call swaps the stacked tensors into it for each call.
        self._skeleton = copy.deepcopy(self._nets[0]).to("meta")
        probe = torch.zeros(1, *self._probe_shape(), device=self.device)
        self._vmapped(probe)  # fails here, not on the first request, if vmap cannot work

    def _probe_shape(self) -> tuple[int, ...]:
        first = next(m for m in self._nets[0].modules() if isinstance(m, nn.Conv2d))
        return (first.in_channels, 8, 8)  # small: it only has to run, not to be realistic

    def _thread_skeleton(self) -> nn.Module:
        # functional_call mutates the module it is given while it runs, so two threads sharing
        # one skeleton would read each other's weights; each thread gets its own (meta: free).
        skeleton = getattr(self._local, "skeleton", None)
        if skeleton is None:
            skeleton = self._local.skeleton = copy.deepcopy(self._skeleton)
        return skeleton

    def _vmapped(self, features: Tensor) -> Tensor:
        skeleton = self._thread_skeleton()

        def one_net(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(skeleton, (params, buffers), (x,))

        with torch.no_grad():
            return torch.vmap(one_net, in_dims=(0, 0, None))(self._params, self._buffers, features)

    def _looped(self, features: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.stack([net(features) for net in self._nets])

    def forward(self, features: Tensor) -> Tensor:
        """``features``: B x C x H x W (any float dtype, any device) -> N x B x D float32 on
        ``self.device``."""
        if features.dim() != 4:
            raise ValueError(f"features must be B x C x H x W, got shape {tuple(features.shape)}")
        features = features.to(self.device, torch.float32)
        return self._vmapped(features) if self.mode == "vmap" else self._looped(features)

    __call__ = forward
