"""GIAS: gradient inversion in alternative spaces, with a generative image prior.

Jeon et al., "Gradient Inversion with Generative Image Prior" (NeurIPS'21), Sec. 4.1: instead of
searching the pixels (Inverting Gradients, GI-x), search the latent code ``z`` of a pretrained
generator ``G`` (GI-z, eq. 5), then adapt a per-image copy of ``G``'s parameters ``w`` with
``z`` fixed (GI-zw, eq. 7). The order matters (their Remark and Sec. 5.1): the low-dimensional
latent search escapes the under-determined pixel problem and lands on a plausible image; the
parameter search then removes the error the imperfect generator cannot express.

Cost: 1 - cosine between the simulated and the observed update (as Inverting Gradients) plus the
total-variation prior, plus an optional ``latent_norm_weight * ||z||`` (GIML's regulariser; GIAS
uses none). The paper has no parameter-distance regulariser: the small parameter learning rate
and its decay keep ``w`` near the prior. Each stage runs Adam with its own learning rate, decayed
x0.1 at 3/8, 5/8 and 7/8 of that stage's iterations (Appendix H and the authors' code).

Restarts: the R latent starts form one ``R x B x nz`` tensor; ``vmap`` evaluates every restart's
images, simulated update and cost in one call and a single backward pass reaches every latent (as
``attacks.py`` batches pixel restarts). The ``param_restarts`` lowest-cost restarts (by the cost
the attacker can compute) carry on into the parameter stage, again batched: their per-image
generator copies are stacked into ``K x B x ...`` parameter tensors and evaluated with nested
``vmap``s. The authors' code carries the single best latent (``param_restarts = 1``).

The generator runs in eval mode (BatchNorm with its running statistics), so each image depends
on its own latent only. Diverged restarts (non-finite cost) stop moving; one can only be chosen
if every restart diverged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedleak.attacker.inversion.attacks import Callback, Reconstruction, _Simulator
from fedleak.attacker.inversion.labels import recover_labels
from fedleak.attacker.inversion.observation import Observation

LATENT, PARAMS = "latent", "params"


@dataclass(frozen=True)
class GenerativeConfig:
    """Hyper-parameters of a generative-prior attack; each preset is one instance.

    ``latent_iterations`` then ``param_iterations`` (0 skips the stage). With
    ``per_image_generator`` every image gets its own copy of ``G`` in the parameter stage (GIAS);
    without, one copy serves the whole batch (GIML's inner loop).
    """

    latent_iterations: int = 1000
    param_iterations: int = 1000
    latent_lr: float = 3e-2
    param_lr: float = 1e-3
    lr_decay: bool = True  # x0.1 at 3/8, 5/8, 7/8 of each stage
    distance: str = "cosine"
    tv_weight: float = 1e-4
    latent_norm_weight: float = 0.0
    restarts: int = 4
    param_restarts: int = 1
    per_image_generator: bool = True

    @property
    def iterations(self) -> int:
        return self.latent_iterations + self.param_iterations


@dataclass
class GenerativeReconstruction(Reconstruction):
    """A :class:`Reconstruction` plus where the generative search ended.

    ``stages`` names the stage of every entry of ``loss_history``; ``latents`` (B x nz) are the
    chosen restart's codes; ``adapted`` its generator parameters after the parameter stage
    (name -> B x ... with ``per_image_generator``, else name -> shape of the parameter), or the
    prior's own parameters when that stage was skipped. ``per_restart_loss`` holds each
    restart's last cost: after the parameter stage for the restarts carried into it, after the
    latent stage for the others.
    """

    latents: Tensor | None = None
    adapted: dict[str, Tensor] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)


def with_budget(config: GenerativeConfig, iterations: int) -> GenerativeConfig:
    """``config`` with ``iterations`` in total, split between the stages in its proportion."""
    share = config.latent_iterations / max(1, config.iterations)
    latent = round(iterations * share)
    return replace(config, latent_iterations=latent, param_iterations=iterations - latent)


def _milestones(n: int, decay: bool) -> list[int]:
    return [int(n * f) for f in (3 / 8, 5 / 8, 7 / 8)] if decay else []


class _Prior:
    """The generator as a pure function of (parameters, latents), for ``vmap`` and ``grad``."""

    def __init__(self, generator: nn.Module, device: torch.device) -> None:
        # A private eval-mode copy: BatchNorm uses its running statistics, so an image depends
        # only on its own latent (batch statistics would couple restarts and images).
        self.net = deepcopy(generator).to(device).eval()
        self.params = {n: p.detach() for n, p in self.net.named_parameters()}
        self.buffers = {n: b.detach() for n, b in self.net.named_buffers()}
        self.latent_dim = int(getattr(self.net, "nz", 0)) or _latent_dim(self.net)

    def __call__(self, params: dict[str, Tensor], z: Tensor) -> Tensor:
        return functional_call(self.net, (params, self.buffers), (z,))

    def per_image(self, params: dict[str, Tensor], z: Tensor) -> Tensor:
        """B images, image b from its own parameter copy ``params[n][b]`` and latent ``z[b]``."""
        return vmap(lambda p, zb: self(p, zb[None])[0])(params, z)


def _latent_dim(net: nn.Module) -> int:
    first = next(m for m in net.modules() if isinstance(m, nn.ConvTranspose2d | nn.Linear))
    return first.in_channels if isinstance(first, nn.ConvTranspose2d) else first.in_features


@dataclass
class _StageResult:
    history: list[Tensor]  # per step: (restarts in the stage,) costs
    final: Tensor  # (restarts,) costs at the end
    diverged: Tensor  # (restarts,) bool


def _adam_stage(
    variables: list[Tensor],
    forward: Callable[[], tuple[Tensor, Tensor]],
    iterations: int,
    lr: float,
    decay: bool,
    step0: int,
    callback: Callback | None,
    ids: list[int],
) -> _StageResult:
    """Adam on ``variables`` (leading dim = restarts) minimising the sum of per-restart costs.

    ``forward()`` gives the (restarts,) costs and the images they belong to; the callback sees
    both, before the step.
    """
    opt = torch.optim.Adam(variables, lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, _milestones(iterations, decay), gamma=0.1)
    restarts = variables[0].shape[0]
    alive = torch.ones(restarts, dtype=torch.bool, device=variables[0].device)
    good = [v.detach().clone() for v in variables]
    history: list[Tensor] = []
    for step in range(iterations):
        opt.zero_grad(set_to_none=False)
        losses, images = forward()
        alive &= torch.isfinite(losses)
        if alive.any():
            losses[alive].sum().backward()
        with torch.no_grad():
            for v in variables:
                if v.grad is not None:
                    v.grad[~alive] = 0  # a diverged restart must not move, nor poison Adam
        opt.step()
        sched.step()
        with torch.no_grad():
            for v, g in zip(variables, good, strict=True):
                ok = alive & torch.isfinite(v.reshape(restarts, -1)).all(dim=1)
                v[~ok] = g[~ok]
                g[ok] = v[ok]
                alive &= ok
        history.append(losses.detach())
        if callback is not None and callback(step0 + step, losses.detach(), images.detach(), ids):
            break
    with torch.no_grad():
        final = forward()[0].detach()
    return _StageResult(history, final, ~alive | ~torch.isfinite(final))


def _rank(final: Tensor, diverged: Tensor) -> Tensor:
    """Restart indices, best first: lowest final cost, diverged ones last."""
    score = torch.where(torch.isfinite(final), final, torch.full_like(final, float("inf")))
    return torch.where(diverged, score + 1e30, score).argsort()


class GenerativeAttack:
    """Gradient inversion through a generator ``prior``; subclasses choose a ``preset``.

    ``prior`` maps latents (N x nz) to images (N x C x H x W) in the data range; give it here or
    to :meth:`reconstruct`. ``iterations`` sets the total budget, split between the stages as in
    the preset; any :class:`GenerativeConfig` field can be overridden by name.
    """

    name: ClassVar[str] = "generative"
    preset: ClassVar[GenerativeConfig] = GenerativeConfig()

    def __init__(
        self, prior: nn.Module | None = None, iterations: int | None = None, **overrides
    ) -> None:
        unknown = set(overrides) - set(GenerativeConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown option(s) for {self.name}: {', '.join(sorted(unknown))}")
        self.config = replace(self.preset, **overrides)
        if iterations is not None:  # a total budget, as for the pixel attacks
            self.config = with_budget(self.config, iterations)
        self.prior = prior
        if self.config.restarts < 1 or self.config.param_restarts < 1:
            raise ValueError("restarts and param_restarts must be >= 1")
        if self.config.latent_iterations < 0 or self.config.param_iterations < 0:
            raise ValueError("iterations must be >= 0")

    def reconstruct(
        self,
        model: nn.Module,
        observation: Observation,
        *,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        prior: nn.Module | None = None,
    ) -> GenerativeReconstruction:
        """Reconstruct the batch behind ``observation``; ``model`` gives the architecture.

        ``labels`` (B,) fixes the labels, otherwise they are recovered from the update.
        ``generator`` seeds the latent starts (default: seed 0). ``callback(step, costs,
        images, restart ids)`` runs at every iteration of both stages (steps numbered on across
        them) with the costs and the images they were computed on, before that iteration's
        update; returning True ends the current stage.
        """
        cfg = self.config
        prior = prior if prior is not None else self.prior
        if prior is None:
            raise ValueError(f"{self.name} needs a generator: pass prior= here or to the attack")
        start = time.perf_counter()
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        device = next(iter(observation.model_state.values())).device
        b, k = observation.batch_size, observation.num_classes
        if labels is None:
            labels = recover_labels(model, observation, generator=gen)
        labels = torch.as_tensor(labels).long()
        sim = _Simulator(model, observation, cfg, soft_labels=False)
        g = _Prior(prior, device)
        onehot = F.one_hot(labels, k).float().to(device)

        z = torch.randn(cfg.restarts, b, g.latent_dim, generator=gen).to(device)
        z, latent = self._latent_stage(sim, g, z, onehot, callback)
        history = list(latent.history)
        order = _rank(latent.final, latent.diverged)
        stages = [LATENT] * len(history)
        adapted = {n: p.detach().clone() for n, p in g.params.items()}
        # Steps and objective evaluations (each step's and every stage's final one) per restart.
        steps = [len(history)] * cfg.restarts
        evaluations = [len(history) + 1] * cfg.restarts
        if cfg.param_iterations == 0:
            best = int(order[0])
            images = g(g.params, z[best]).detach()
            return self._result(
                images,
                labels,
                [float(h[best]) for h in history],
                latent.final,
                best,
                latent.diverged,
                z[best],
                adapted,
                stages,
                start,
                (steps, evaluations),
            )
        carried = order[: cfg.param_restarts]
        params, stage = self._param_stage(sim, g, z[carried], onehot, callback, len(history))
        post = _rank(stage.final, stage.diverged)
        win = int(post[0])  # index among the carried restarts
        best = int(carried[win])
        curve = [float(h[best]) for h in history] + [float(h[win]) for h in stage.history]
        stages += [PARAMS] * len(stage.history)
        chosen = {n: p[win].detach() for n, p in params.items()}
        with torch.no_grad():
            images = g.per_image(chosen, z[best]) if cfg.per_image_generator else g(chosen, z[best])
        final = latent.final.clone()
        final[carried] = stage.final
        diverged = latent.diverged.clone()
        diverged[carried] = stage.diverged
        for r in carried.tolist():
            steps[r] += len(stage.history)
            evaluations[r] += len(stage.history) + 1
        return self._result(
            images,
            labels,
            curve,
            final,
            best,
            diverged,
            z[best],
            chosen,
            stages,
            start,
            (steps, evaluations),
        )

    # --- stages ----------------------------------------------------------------------------

    def _cost(self, sim: _Simulator, images: Tensor, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """One restart's cost, and its images (returned so no second generator pass is needed)."""
        cost = sim.objective(images, y)
        if self.config.latent_norm_weight:
            cost = cost + self.config.latent_norm_weight * z.pow(2).sum().sqrt()
        return cost, images

    def _latent_stage(
        self, sim: _Simulator, g: _Prior, z0: Tensor, onehot: Tensor, callback: Callback | None
    ) -> tuple[Tensor, _StageResult]:
        cfg = self.config
        z = z0.clone().requires_grad_(True)
        restarts = len(z)
        y = onehot.expand(restarts, *onehot.shape)

        def forward() -> tuple[Tensor, Tensor]:
            return vmap(lambda zr, yr: self._cost(sim, g(g.params, zr), yr, zr))(z, y)

        result = _adam_stage(
            [z],
            forward,
            cfg.latent_iterations,
            cfg.latent_lr,
            cfg.lr_decay,
            0,
            callback,
            list(range(restarts)),
        )
        return z.detach(), result

    def _param_stage(
        self,
        sim: _Simulator,
        g: _Prior,
        z: Tensor,
        onehot: Tensor,
        callback: Callback | None,
        step0: int,
    ) -> tuple[dict[str, Tensor], _StageResult]:
        cfg = self.config
        k, b = z.shape[:2]
        lead = (k, b) if cfg.per_image_generator else (k,)
        params = {
            n: p.expand(*lead, *p.shape).clone().requires_grad_(True) for n, p in g.params.items()
        }
        y = onehot.expand(k, *onehot.shape)
        render = g.per_image if cfg.per_image_generator else g

        def forward() -> tuple[Tensor, Tensor]:
            return vmap(lambda pr, zr, yr: self._cost(sim, render(pr, zr), yr, zr))(params, z, y)

        result = _adam_stage(
            list(params.values()),
            forward,
            cfg.param_iterations,
            cfg.param_lr,
            cfg.lr_decay,
            step0,
            callback,
            list(range(k)),
        )
        return {n: p.detach() for n, p in params.items()}, result

    # --- result ----------------------------------------------------------------------------

    @staticmethod
    def _result(
        images: Tensor,
        labels: Tensor,
        curve: list[float],
        final: Tensor,
        best: int,
        diverged: Tensor,
        latents: Tensor,
        adapted: dict[str, Tensor],
        stages: list[str],
        start: float,
        work: tuple[list[int], list[int]],
    ) -> GenerativeReconstruction:
        steps, evaluations = work
        return GenerativeReconstruction(
            images=images.detach().cpu(),
            labels=labels.cpu(),
            loss_history=curve,
            per_restart_loss=final.float().cpu().tolist(),
            iterations=len(curve),
            seconds=time.perf_counter() - start,
            restart=best,
            discarded=[i for i, d in enumerate(diverged.cpu().tolist()) if d],
            evaluations=sum(evaluations),
            per_restart_iterations=steps,
            per_restart_evaluations=evaluations,
            latents=latents.detach().cpu(),
            adapted={n: p.cpu() for n, p in adapted.items()},
            stages=stages,
        )


class GIAS(GenerativeAttack):
    """GIAS (GI-zw): latent search, then per-image generator adaptation from the found latents.

    Learning rates 3e-2 (latent) and 1e-3 (parameters), Adam decayed x0.1 at 3/8, 5/8, 7/8 of
    each stage, cosine distance, TV 1e-4: Appendix H and the authors' scripts. The split of the
    iteration budget is a free choice there (their ImageNet-32 script: 500 + 5000, GIML 1000 +
    500); here an even split, overridable.
    """

    name = "gias"
    preset = GenerativeConfig()


class LatentSearch(GenerativeAttack):
    """GI-z, GIAS's first stage alone: the whole budget on the latent code, ``G`` frozen."""

    name = "gi-latent"
    preset = GenerativeConfig(latent_iterations=2000, param_iterations=0)
