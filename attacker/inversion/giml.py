"""GIML: meta-learn the generative prior from observed updates alone (Jeon et al., Sec. 4.2).

Without clean data, the attacker starts from an arbitrary (e.g. untrained) generator ``G_w`` and
treats every observed update as a small task. For each task, a variant of GIAS:

1. latent search with the same cost plus ``latent_norm_weight * ||z||`` (the paper's
   regulariser: with an untrained generator the latent search otherwise diverges);
2. a few steps on ONE copy of ``G``'s parameters shared by the task's images (the "integrated"
   parameter search: meta information that helps every image, not per-image adaptation),
   giving adapted parameters ``w'``.

Outer step, Reptile (Nichol et al., 2018): ``w <- w + eps * mean_tasks(w' - w)``, ``eps``
annealed linearly to 0. The authors' code instead runs Adam (lr 1e-2) on ``||w' - w||^2``, i.e.
an Adam step along the same direction; the plain Reptile interpolation keeps the step bounded by
the inner adaptation, which matters for a DCGAN whose weights are ~0.02. After meta-learning, the
generator is used with GIAS (:class:`GIML` is GIAS holding a meta-learned prior).

The attacker uses only ``Observation``s (the sent model state and the update); labels are
recovered from each update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn

from fedleak.attacker.inversion.generative import GenerativeAttack, GenerativeConfig
from fedleak.attacker.inversion.observation import Observation
from fedleak.attacker.inversion.prior import PriorSettings, build_generator, latent_side

# callback(meta step, mean final task cost, the generator after the step) -> stop?
MetaCallback = Callable[[int, float, nn.Module], bool | None]


@dataclass(frozen=True)
class GIMLConfig:
    """Reptile over gradient-inversion tasks; ``inner`` is the per-task GIAS variant.

    The inner preset follows the authors' meta-training script (latent lr 3e-2, parameter lr
    1e-3, TV 1e-4, ``||z||`` weight 1e-3, one restart, one shared generator copy) with the
    iteration counts scaled down from 1000 + 500 to stay CPU-sized.
    """

    meta_steps: int = 60
    tasks_per_step: int = 1
    meta_lr: float = 1.0
    anneal: bool = True
    inner: GenerativeConfig = field(
        default_factory=lambda: GenerativeConfig(
            latent_iterations=150,
            param_iterations=100,
            latent_norm_weight=1e-3,
            restarts=1,
            per_image_generator=False,
        )
    )


def untrained_generator(image_shape: tuple[int, int, int], seed: int = 0) -> nn.Module:
    """A randomly initialised DCGAN generator for ``image_shape`` (side 32 or 64), eval mode."""
    channels, side = image_shape[0], image_shape[-1]
    widths = {32: (128, 64, 32), 64: (256, 128, 64, 32)}.get(side)
    if widths is None or latent_side(widths) != side:
        raise ValueError(f"no default generator for {side}x{side} images (32 or 64)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_generator(PriorSettings(widths=widths), channels).eval()


def reptile_step(
    generator: nn.Module, adapted: Sequence[dict[str, torch.Tensor]], step_size: float
) -> None:
    """``w <- w + step_size * mean(w' - w)`` over the tasks' adapted parameters, in place."""
    with torch.no_grad():
        for name, p in generator.named_parameters():
            target = torch.stack([a[name].to(p.device) for a in adapted]).mean(0)
            p.add_(step_size * (target - p))


def meta_learn_generator(
    model: nn.Module,
    observations: Sequence[Observation],
    config: GIMLConfig | None = None,
    *,
    prior: nn.Module | None = None,
    generator: torch.Generator | None = None,
    callback: MetaCallback | None = None,
) -> tuple[nn.Module, list[float]]:
    """Meta-learn a generator from ``observations``; returns it (eval mode) and the per-step
    mean final inner cost.

    ``prior`` is the starting generator (copied, not modified; default: an untrained DCGAN).
    Tasks are drawn in a random order (``generator``), cycling through the observations.
    """
    cfg = config or GIMLConfig()
    if not observations:
        raise ValueError("GIML needs at least one observed update")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    g = deepcopy(prior) if prior is not None else untrained_generator(observations[0].image_shape)
    g.eval()
    inner = GenerativeAttack(**_fields(cfg.inner))
    order: list[int] = []
    costs: list[float] = []
    for step in range(cfg.meta_steps):
        adapted, finals = [], []
        for _ in range(cfg.tasks_per_step):
            if not order:
                order = torch.randperm(len(observations), generator=gen).tolist()
            rec = inner.reconstruct(model, observations[order.pop()], generator=gen, prior=g)
            adapted.append(rec.adapted)
            finals.append(min(rec.per_restart_loss))
        eps = cfg.meta_lr * (1 - step / cfg.meta_steps if cfg.anneal else 1.0)
        reptile_step(g, adapted, eps)
        costs.append(sum(finals) / len(finals))
        if callback is not None and callback(step, costs[-1], g):
            break
    return g.eval(), costs


def _fields(config: GenerativeConfig) -> dict:
    return {name: getattr(config, name) for name in GenerativeConfig.__dataclass_fields__}


class GIML(GenerativeAttack):
    """GIAS with a prior meta-learned from observed updates: call :meth:`meta_learn` first
    (or pass a prior), then :meth:`reconstruct`. Reconstruction uses the GIAS preset."""

    name = "giml"
    preset = GenerativeConfig()

    def __init__(
        self, prior: nn.Module | None = None, meta: GIMLConfig | None = None, **overrides
    ) -> None:
        super().__init__(prior, **overrides)
        self.meta = meta or GIMLConfig()
        self.meta_history: list[float] = []

    def meta_learn(
        self,
        model: nn.Module,
        observations: Sequence[Observation],
        *,
        generator: torch.Generator | None = None,
        callback: MetaCallback | None = None,
    ) -> nn.Module:
        """Meta-learn the prior from ``observations`` (starting from the current prior, if
        any) and keep it for :meth:`reconstruct`."""
        self.prior, self.meta_history = meta_learn_generator(
            model,
            observations,
            self.meta,
            prior=self.prior,
            generator=generator,
            callback=callback,
        )
        return self.prior
