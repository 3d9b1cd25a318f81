"""Optimisation-based gradient inversion: DLG, iDLG and Inverting Gradients.

Every attack searches for inputs whose simulated update matches the observed one. The update is
simulated with the sent parameters: the gradient of the mean cross-entropy for FedSGD, or the
local SGD steps unrolled differentiably for FedAvg (Geiping et al., "Inverting Gradients",
Sec. 5), so the distance can be differentiated with respect to the candidate inputs. Inputs are
in the data range [-1, 1]; a network that expects another range carries its
``fedleak.models.leakage.InputTransform``.

Restarts run together for both optimisers: the R restarts of a B-image batch form one
``R x B x C x H x W`` tensor and ``vmap`` computes every restart's simulated update and distance
in one call. With Adam the R losses are summed and one backward pass reaches every candidate;
Adam works element by element, so this equals R independent runs. With L-BFGS,
``lbfgs.BatchedLBFGS`` keeps every restart's own curvature history, step and stopping flags, so
restart r follows the iterates it would follow alone (tested). ``restarts_mode="sequential"``
runs them one after another, for comparison; a restart alone is simulated with plain autograd
(FedSGD), which is faster than ``torch.func`` for one small network.

Stopping: every restart runs ``iterations`` steps unless a callback stops the search or, for
L-BFGS, the stopping rule (``stall_window``, ``prune_every``) ends restarts early. The result
reports the work done: steps and objective evaluations per restart, wall time, the chosen restart
and every restart's final objective.

Divergence: a restart whose loss turns NaN/inf or grows past ``explode`` times its first loss
(or whose inputs stop being finite) is rolled back to its last good iterate; with L-BFGS it is
started afresh up to ``max_resets`` times, with Adam (whose schedule is shared) it is frozen and
can only be chosen if every restart diverged. The winner is the restart with the lowest final
objective, which the attacker can compute; ground truth never enters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from fedleak.attacker.inversion.labels import idlg_label, output_gradient, recover_labels
from fedleak.attacker.inversion.lbfgs import BatchedLBFGS, LBFGSOptions
from fedleak.attacker.inversion.objectives import TotalVariation, get_distance
from fedleak.attacker.inversion.observation import Observation, sent_model, trainable

# callback(step, losses of the restarts in flight, their images, their restart ids) -> stop?
Callback = Callable[[int, Tensor, Tensor, list[int]], bool | None]


@dataclass(frozen=True)
class InversionConfig:
    """Hyper-parameters of an optimisation attack; each preset is one instance."""

    optimizer: Literal["adam", "lbfgs"] = "adam"
    lr: float = 0.1
    iterations: int = 4800
    lr_decay: bool = True  # Adam: x0.1 at 3/8, 5/8 and 7/8 of the iterations
    distance: str = "cosine"
    tv_weight: float = 0.0
    labels: Literal["optimize", "recover"] = "recover"
    restarts: int = 1
    init_scale: float = 1.0  # random starts: N(0, init_scale^2) per pixel, 0 = mid-grey
    restarts_mode: Literal["batched", "sequential"] = "batched"
    clamp: bool = True  # project the inputs into ``bounds`` after every step
    bounds: tuple[float, float] = (-1.0, 1.0)
    signed: bool = False  # Adam on the sign of the input gradient (Geiping et al.'s option)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lbfgs_max_iter: int = 20
    lbfgs_history: int = 100
    lbfgs_tolerance_grad: float = 1e-7  # torch's defaults (see lbfgs.py)
    lbfgs_tolerance_change: float = 1e-9
    lbfgs_curvature: float = 1e-10
    line_search: Literal["none", "backtracking"] = "none"  # L-BFGS, per restart (lbfgs.py)
    relative: bool = False  # divide the distance by the observed update's energy
    seed: Literal["softmax", "observed", "rescaled", "auto"] = "softmax"  # see _Simulator
    # Stopping (L-BFGS): a restart whose best objective over the last ``stall_window`` steps is
    # not ``stall_tolerance`` (relative) below its best before them has converged (or is stuck)
    # and stops; every ``prune_every`` steps the worse half of the restarts still running stop
    # (ranked by objective, ground truth never enters). 0 turns either off.
    stall_window: int = 0
    stall_tolerance: float = 1e-2
    prune_every: int = 0
    explode: float = 1e4
    max_resets: int = 2


@dataclass
class Reconstruction:
    """The chosen restart's images and labels, and the work the search did.

    Per restart (index = restart id): ``per_restart_loss`` its final objective,
    ``per_restart_iterations`` its optimiser steps (L-BFGS steps of up to ``lbfgs_max_iter``
    inner iterations, or Adam steps), ``per_restart_evaluations`` how often the objective and
    its input gradient were evaluated for it (each a simulated client gradient and its
    derivative). ``iterations`` and ``loss_history`` are the chosen restart's (its objective
    at every step), ``evaluations`` the total over all restarts, ``seconds`` the wall time of
    the whole reconstruction. ``stopped`` says why the search ended: ``"budget"`` (every
    restart ran its iterations), ``"callback"`` or ``"converged"`` (the stopping rule).
    """

    images: Tensor
    labels: Tensor
    loss_history: list[float]
    per_restart_loss: list[float]
    iterations: int
    seconds: float
    restart: int = 0  # index of the chosen restart
    discarded: list[int] = field(default_factory=list)  # restarts that ended diverged
    resets: int = 0  # L-BFGS restarts started afresh after a divergence
    evaluations: int = 0
    per_restart_iterations: list[int] = field(default_factory=list)
    per_restart_evaluations: list[int] = field(default_factory=list)
    stopped: str = "budget"
    seed: str = "softmax"  # the dL/dlogits the simulation backpropagated (see _Simulator)


class _Simulator:
    """The attacker's copy of the client computation and the per-restart objective.

    ``seed`` is the gradient of the loss with respect to the logits that the simulated client
    backpropagates: ``"softmax"`` the candidate's own ``p - y`` (the client's computation).
    For one image under FedSGD the true ``p - y`` is observed (the classifier's bias gradient),
    which allows two alternatives. ``"observed"`` backpropagates it as it is. ``"rescaled"``
    keeps the candidate's direction but takes the observed size ``1 - p_c``: when the victim's
    image is classified confidently, ``1 - p_c`` is tiny and changes exponentially with the
    logit margin, so with the softmax seed the whole simulated update swings in scale with every
    step and L-BFGS crawls along that stiff direction (two held-out CIFAR-10 images with update
    norms near 0.5 stalled at 18-23 dB). At the true image every seed gives the true update.

    ``relative`` divides the distance by the observed update's energy, so the objective's size
    does not depend on how confident the model was on the victim's image.
    """

    def __init__(
        self,
        model: nn.Module,
        observation: Observation,
        config: InversionConfig,
        soft_labels: bool,
        seed: str = "softmax",
        relative: bool = False,
    ) -> None:
        self.net = sent_model(model, observation)
        if self.net.training:
            # Batch statistics, as the client used; running-stat updates would break vmap.
            replace_all_batch_norm_modules_(self.net)
        names = list(trainable(model))
        if len(names) != len(observation.update):
            raise ValueError(
                f"the update has {len(observation.update)} tensors, the model "
                f"{len(names)} trainable parameters"
            )
        self.names = names
        self.params = {n: observation.model_state[n].detach() for n in names}
        live = dict(self.net.named_parameters())
        self.live = [live[n] for n in names]  # the copy's own leaves, for plain autograd
        # The same network as constants: logits that depend on the input only.
        self.frozen = deepcopy(self.net).requires_grad_(False)
        self.target = [u.detach() for u in observation.update]
        self.obs = observation
        self.distance = get_distance(config.distance)
        self.scale = 1.0
        if relative:
            energy = sum(float(t.double().pow(2).sum()) for t in self.target)
            self.scale = 1.0 / max(energy, 1e-30)
        self.tv_weight = config.tv_weight
        self.tv = TotalVariation()
        self.soft_labels = soft_labels
        self.seed_mode = seed
        self.seed = output_gradient(observation) if seed != "softmax" else None

    def seed_vector(self, x: Tensor, y: Tensor) -> Tensor | None:
        """dL/dlogits the simulated client backpropagates (B x K), None for its own softmax.

        ``"rescaled"``: the candidate's ``p - y`` direction from logits computed with constant
        parameters (a function of the candidate only, so the parameter gradient of
        ``logits . seed`` is ``J^T seed``), times the observed ``1 - p_c``. Works on any
        leading batch shape, so all restarts share one forward pass.
        """
        if self.seed_mode == "softmax":
            return None
        if self.seed_mode == "observed":
            return self.seed.expand_as(y)
        lead = x.shape[: -len(self.obs.image_shape)]
        free = self.frozen(x.reshape(-1, *self.obs.image_shape)).view(*lead, -1)
        others = free.masked_fill(y > 0.5, float("-inf"))  # y: the known one-hot label
        direction = others.softmax(dim=-1) - y  # p_k / (1 - p_c) off the label, -1 on it
        return direction * -(self.seed * y).sum(dim=-1, keepdim=True)  # observed 1 - p_c

    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor, seed: Tensor | None):
        logits = functional_call(self.net, params, (x,))
        return F.cross_entropy(logits, y) if seed is None else (logits * seed).sum()

    def update(self, x: Tensor, y: Tensor, seed: Tensor | None = None) -> list[Tensor]:
        """The update the client would send for inputs ``x`` and label distributions ``y``
        (``seed``: see :meth:`seed_vector`; FedSGD only)."""
        grad_fn = grad(self._loss)
        if self.obs.kind == "fedsgd":
            g = grad_fn(self.params, x, y, seed)
            return [g[n] for n in self.names]
        size = self.obs.local_batch_size or len(x)
        xs, ys = x.split(size), y.split(size)
        params = dict(self.params)
        for step in range(self.obs.local_steps):
            g = grad_fn(params, xs[step % len(xs)], ys[step % len(xs)], None)
            params = {n: params[n] - self.obs.local_lr * g[n] for n in self.names}
        return [params[n] - self.params[n] for n in self.names]

    def _plain_update(self, x: Tensor, y: Tensor, seed: Tensor | None) -> list[Tensor]:
        """``update`` for FedSGD with plain autograd (``create_graph``), as DLG's code does it.

        The same numbers as the ``torch.func`` version (tested); for a network as small as
        DLG's LeNet the functional transforms cost more than the arithmetic, and a restart
        running alone needs no ``vmap``.
        """
        with torch.enable_grad():  # also when the caller only wants the value
            logits = self.net(x)
            loss = F.cross_entropy(logits, y) if seed is None else (logits * seed).sum()
            return list(torch.autograd.grad(loss, self.live, create_graph=True))

    def objective(
        self, x: Tensor, y: Tensor, seed: Tensor | None = None, plain: bool = False
    ) -> Tensor:
        """One restart's loss: update distance plus the TV prior; ``x`` is B x C x H x W."""
        probs = y.softmax(dim=-1) if self.soft_labels else y
        simulated = self._plain_update(x, probs, seed) if plain else self.update(x, probs, seed)
        loss = self.scale * self.distance(simulated, self.target)
        return loss + self.tv_weight * self.tv(x) if self.tv_weight else loss

    def losses(self, xs: Tensor, ys: Tensor, vectorized: bool) -> Tensor:
        """Per-restart losses for R x B x ... candidates."""
        seeds = self.seed_vector(xs, ys)
        if vectorized and len(xs) > 1:
            dims = (0, 0, None if seeds is None else 0)
            return vmap(self.objective, in_dims=dims, randomness="same")(xs, ys, seeds)
        plain = self.obs.kind == "fedsgd"
        return torch.stack(
            [
                self.objective(x, y, None if seeds is None else seeds[r], plain)
                for r, (x, y) in enumerate(zip(xs, ys, strict=True))
            ]
        )


@dataclass
class _Run:
    """What the restarts optimised together (all of them, or one when sequential) ended with.

    ``history[r]`` is restart r's objective at every step of its last attempt.
    """

    images: Tensor
    label_logits: Tensor
    history: list[list[float]]
    final: Tensor  # (restarts,) objective at the end
    diverged: Tensor  # (restarts,) bool: ended diverged
    iterations: Tensor  # (restarts,) steps taken (in the last attempt for L-BFGS)
    evaluations: Tensor  # (restarts,) objective-and-gradient evaluations, all attempts
    resets: int = 0
    stopped: str = "budget"


class OptimizationAttack:
    """Gradient inversion by optimisation; subclasses only choose a ``preset``."""

    name: ClassVar[str] = "optimization"
    preset: ClassVar[InversionConfig] = InversionConfig()

    def __init__(self, **overrides) -> None:
        unknown = set(overrides) - set(InversionConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown option(s) for {self.name}: {', '.join(sorted(unknown))}")
        self.config = replace(self.preset, **overrides)
        if self.config.restarts_mode not in ("batched", "sequential"):
            raise ValueError(
                f"restarts_mode must be batched or sequential, got {self.config.restarts_mode!r}"
            )
        if self.config.seed not in ("softmax", "observed", "rescaled", "auto"):
            raise ValueError(
                f"seed must be softmax, observed, rescaled or auto, got {self.config.seed!r}"
            )
        if self.config.optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"unknown optimizer {self.config.optimizer!r} (adam or lbfgs)")
        if self.config.relative and self.config.distance != "l2":
            raise ValueError("relative applies to the l2 distance (cosine is scale-free already)")
        stopping = self.config.stall_window or self.config.prune_every
        if self.config.optimizer != "lbfgs" and stopping:
            raise ValueError("stall_window and prune_every apply to L-BFGS attacks only")
        if self.config.stall_window < 0 or self.config.prune_every < 0:
            raise ValueError("stall_window and prune_every must be >= 0")
        if self.config.restarts < 1 or self.config.iterations < 0:
            raise ValueError("restarts must be >= 1 and iterations >= 0")
        self._lbfgs_options()  # rejects a bad line search before any work

    def _lbfgs_options(self) -> LBFGSOptions:
        cfg = self.config
        return LBFGSOptions(
            lr=cfg.lr,
            max_iter=cfg.lbfgs_max_iter,
            history=cfg.lbfgs_history,
            tolerance_grad=cfg.lbfgs_tolerance_grad,
            tolerance_change=cfg.lbfgs_tolerance_change,
            curvature_min=cfg.lbfgs_curvature,
            line_search=cfg.line_search,
        )

    def reconstruct(
        self,
        model: nn.Module,
        observation: Observation,
        *,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> Reconstruction:
        """Reconstruct the batch behind ``observation``; ``model`` gives the architecture.

        ``labels`` (B,) fixes the labels (known labels); otherwise the preset recovers them
        from the update or optimises soft labels (DLG). ``generator`` seeds the random starts
        (default: seed 0). ``callback`` is called after every iteration; returning True stops.
        """
        cfg = self.config
        start = time.perf_counter()
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        device = next(iter(observation.model_state.values())).device
        b, k = observation.batch_size, observation.num_classes
        optimize_labels = labels is None and cfg.labels == "optimize"
        if labels is None and not optimize_labels:
            labels = (
                torch.tensor([idlg_label(observation)])
                if b == 1
                else recover_labels(model, observation, generator=gen, bounds=cfg.bounds)
            )
        seed = self._seed(observation, optimize_labels)
        sim = _Simulator(model, observation, cfg, optimize_labels, seed, cfg.relative)

        shape = (cfg.restarts, b, *observation.image_shape)
        dtype = observation.update[0].dtype  # float64 observations are attacked in float64
        images0 = torch.randn(shape, generator=gen).to(device, dtype) * cfg.init_scale
        if optimize_labels:
            label0 = torch.randn(cfg.restarts, b, k, generator=gen).to(device, dtype)
        else:
            label0 = F.one_hot(torch.as_tensor(labels).long(), k).to(device, dtype)
            label0 = label0.expand(cfg.restarts, b, k).contiguous()

        run = self._lbfgs if cfg.optimizer == "lbfgs" else self._adam
        if cfg.restarts_mode == "batched":
            ids = list(range(cfg.restarts))
            runs = [run(sim, images0, label0, optimize_labels, gen, callback, ids)]
        else:  # one after another, for comparison: each alone is exactly its batched self
            runs = []
            for r in range(cfg.restarts):
                one = slice(r, r + 1)
                x0, y0 = images0[one], label0[one]
                runs.append(run(sim, x0, y0, optimize_labels, gen, callback, [r]))
                if runs[-1].stopped == "callback":
                    break
        result = self._choose(runs, optimize_labels, labels, time.perf_counter() - start)
        result.seed = seed
        return result

    def _seed(self, observation: Observation, optimize_labels: bool) -> str:
        """The dL/dlogits the simulation backpropagates; ``"auto"`` takes ``"rescaled"`` where
        the output gradient is observed (FedSGD, one image, a classifier bias, known labels)."""
        mode = self.config.seed
        if mode == "softmax":
            return mode
        try:
            output_gradient(observation)
        except ValueError:
            if mode == "auto":
                return "softmax"
            raise
        if optimize_labels:
            if mode == "auto":
                return "softmax"
            raise ValueError(f"seed {mode!r} needs known or recovered labels, not optimised ones")
        return "rescaled" if mode == "auto" else mode

    # --- optimisers ----------------------------------------------------------------------

    def _adam(
        self,
        sim: _Simulator,
        images0: Tensor,
        label0: Tensor,
        optimize_labels: bool,
        gen: torch.Generator,
        callback: Callback | None,
        ids: list[int],
    ) -> _Run:
        cfg = self.config
        vectorized = cfg.restarts_mode == "batched"
        x = images0.clone().requires_grad_(True)
        y = label0.clone().requires_grad_(optimize_labels)
        variables = [x, y] if optimize_labels else [x]
        opt = torch.optim.Adam(variables, lr=cfg.lr, betas=cfg.adam_betas)
        n = cfg.iterations
        milestones = [int(n * f) for f in (3 / 8, 5 / 8, 7 / 8)] if cfg.lr_decay else []
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        alive = torch.ones(len(x), dtype=torch.bool, device=x.device)
        good = [v.detach().clone() for v in variables]
        history: list[Tensor] = []
        first: Tensor | None = None
        stopped = "budget"
        for step in range(n):
            opt.zero_grad(set_to_none=False)
            losses = sim.losses(x, y, vectorized)
            first = losses.detach().clone() if first is None else first
            alive &= torch.isfinite(losses) & (losses <= cfg.explode * first.abs())
            if alive.any():
                losses[alive].sum().backward()
            with torch.no_grad():
                for v in variables:
                    if v.grad is not None:  # None only if every restart died at step 0
                        v.grad[~alive] = 0  # a diverged restart must not move, nor poison Adam
                if cfg.signed:
                    x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                if cfg.clamp:
                    x.clamp_(*cfg.bounds)
                for v, g in zip(variables, good, strict=True):
                    ok = alive & torch.isfinite(v.flatten(1)).all(dim=1)
                    v[~ok] = g[~ok]  # roll diverged restarts back to their last good iterate
                    g[ok] = v[ok]
                    alive &= ok
            history.append(losses.detach())
            if callback is not None and callback(step, losses.detach(), x.detach(), ids):
                stopped = "callback"
                break
        with torch.no_grad():
            final = sim.losses(x, y, vectorized).detach()
        steps = len(history)
        count = torch.full((len(ids),), steps, dtype=torch.long)
        return _Run(
            images=x.detach(),
            label_logits=y.detach(),
            history=torch.stack(history).T.tolist() if history else [[] for _ in ids],
            final=final,
            diverged=~alive,
            iterations=count,
            evaluations=count + 1,  # every step's evaluation and the final one
            stopped=stopped,
        )

    def _lbfgs(
        self,
        sim: _Simulator,
        images0: Tensor,
        label0: Tensor,
        optimize_labels: bool,
        gen: torch.Generator,
        callback: Callback | None,
        ids: list[int],
    ) -> _Run:
        """L-BFGS on every restart at once (:class:`BatchedLBFGS`), each with its own state.

        A restart whose objective turns non-finite or grows past ``explode`` times its first
        value (or whose point stops being finite) is started afresh from a new random point,
        with a fresh history and the full budget, up to ``max_resets`` times; after that it is
        rolled back to its last good point and marked diverged.
        """
        cfg = self.config
        restarts = len(images0)
        split = images0[0].numel()  # the flat point: images, then (DLG) the label logits
        image_shape, label_shape = images0.shape[1:], label0.shape[1:]

        def pack(x: Tensor, y: Tensor) -> Tensor:
            parts = [x.flatten(1), y.flatten(1)] if optimize_labels else [x.flatten(1)]
            return torch.cat(parts, dim=1)

        def unpack(z: Tensor) -> tuple[Tensor, Tensor]:
            x = z[:, :split].view(len(z), *image_shape)
            if optimize_labels:
                return x, z[:, split:].view(len(z), *label_shape)
            return x, label0[:1].expand(len(z), *label_shape)  # known labels: the same for all

        def simulate(z: Tensor) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                values = sim.losses(*unpack(z), vectorized=True)
                (grad,) = torch.autograd.grad(values.sum(), z)
            return values.detach(), grad

        def objective(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
            if bool(rows.all()):
                return simulate(z)
            # Only the restarts still searching are simulated (a finished one costs nothing).
            index = rows.nonzero().flatten()
            losses = z.new_full((len(z),), float("nan"))
            grads = torch.zeros_like(z)
            if len(index):
                losses[index], grads[index] = simulate(z[index])
            return losses, grads

        opt = BatchedLBFGS(pack(images0, label0), self._lbfgs_options())
        device = images0.device
        steps = torch.zeros(restarts, dtype=torch.long, device=device)
        resets = torch.zeros(restarts, dtype=torch.long, device=device)
        evaluations = torch.zeros(restarts, dtype=torch.long, device=device)
        diverged = torch.zeros(restarts, dtype=torch.bool, device=device)
        finished = torch.zeros(restarts, dtype=torch.bool, device=device)  # stalled or pruned
        first = torch.full((restarts,), float("nan"), device=device, dtype=images0.dtype)
        latest = first.clone()  # each restart's objective at its last step
        good = opt.x.clone()  # each restart's last good point
        live = torch.arange(restarts, device=device)  # the optimiser's rows, as restarts
        history: list[list[float]] = [[] for _ in range(restarts)]
        stopped, step = "budget", 0
        while True:
            active = ~diverged & ~finished & (steps < cfg.iterations)
            if not active.any():
                if finished.any() and (finished | diverged).all():
                    stopped = "converged"
                break
            if not active[live].all():  # restarts that are done leave the optimiser
                done = ~active[live]
                evaluations[live[done]] += opt.evaluations[done]
                opt.keep(~done)
                live = live[~done]
            before = torch.full_like(first, float("nan"))
            before[live] = opt.step(objective, torch.ones_like(live, dtype=torch.bool))
            first = torch.where(active & (steps == 0), before, first)
            steps += active.long()
            finite = torch.zeros_like(active)
            finite[live] = torch.isfinite(opt.x).all(dim=1)
            bad = active & ~(finite & (before <= cfg.explode * first.abs()))
            ok = active & ~bad
            if cfg.clamp:
                opt.x[:, :split] = opt.x[:, :split].clamp(*cfg.bounds)
            good[live] = torch.where(ok[live][:, None], opt.x, good[live])
            latest = torch.where(ok, before, latest)
            for r in ok.nonzero().flatten().tolist():
                history[r].append(float(before[r]))
            if bad.any():
                self._reset(opt, live, bad, resets, steps, diverged, good, history, gen, split)
            finished |= self._stopping(history, ok, step + 1, ~diverged & ~finished & ~bad)
            if callback is not None:
                # The restarts in flight; their images share the optimiser's point.
                images = opt.x[:, :split].view(len(live), *image_shape)
                if callback(step, latest[live], images, [ids[r] for r in live.tolist()]):
                    stopped = "callback"
                    break
            step += 1
        evaluations[live] += opt.evaluations
        final, _ = objective(good, torch.ones(restarts, dtype=torch.bool, device=device))
        x, y = unpack(good)
        return _Run(
            images=x.detach(),
            label_logits=y.detach(),
            history=history,
            final=final,
            diverged=diverged,
            iterations=steps.cpu(),
            evaluations=(evaluations + 1).cpu(),  # and the final evaluation
            resets=int(resets.sum()),
            stopped=stopped,
        )

    def _stopping(
        self, history: list[list[float]], stepped: Tensor, step: int, running: Tensor
    ) -> Tensor:
        """Restarts that stop now: stalled ones, and at a pruning step the worse half."""
        cfg = self.config
        stop = torch.zeros_like(stepped)
        w = cfg.stall_window
        for r in stepped.nonzero().flatten().tolist():
            losses = history[r]
            if w and len(losses) > w:
                stop[r] = min(losses[-w:]) > min(losses[:-w]) * (1 - cfg.stall_tolerance)
        left = (running & ~stop).nonzero().flatten().tolist()
        if cfg.prune_every and step % cfg.prune_every == 0 and len(left) > 1:
            latest = [history[r][-1] if history[r] else float("inf") for r in left]
            order = sorted(range(len(left)), key=lambda i: latest[i])
            for i in order[(len(left) + 1) // 2 :]:
                stop[left[i]] = True
        return stop

    def _reset(
        self,
        opt: BatchedLBFGS,
        live: Tensor,
        bad: Tensor,
        resets: Tensor,
        steps: Tensor,
        diverged: Tensor,
        good: Tensor,
        history: list[list[float]],
        gen: torch.Generator,
        split: int,
    ) -> None:
        """Fresh starts for the diverged restarts that have resets left; the others give up
        (back to their last good point; they leave the optimiser at the next step). A point is
        ``split`` image values, then (DLG) label logits."""
        fresh = bad & (resets < self.config.max_resets)
        start = opt.x.clone()
        rows = {r: i for i, r in enumerate(live.tolist())}
        for r in fresh.nonzero().flatten().tolist():
            # Drawn after all the initial starts, in restart order.
            point = torch.randn(good.shape[1], generator=gen).to(good)
            point[:split] *= self.config.init_scale
            start[rows[r]] = point
            history[r].clear()
        opt.reset(fresh[live], start)
        resets += fresh.long()
        steps.masked_fill_(fresh, 0)
        give_up = bad & ~fresh
        diverged |= give_up
        opt.x = torch.where(give_up[live][:, None], good[live], opt.x)

    # --- result --------------------------------------------------------------------------

    def _choose(
        self, runs: list[_Run], optimize_labels: bool, labels: Tensor | None, seconds: float
    ) -> Reconstruction:
        final = torch.cat([r.final for r in runs]).float().cpu()
        discarded = torch.cat([r.diverged for r in runs]).cpu()
        images = torch.cat([r.images for r in runs])
        logits = torch.cat([r.label_logits for r in runs])
        histories = [h for r in runs for h in r.history]
        iterations = torch.cat([r.iterations for r in runs]).tolist()
        evaluations = torch.cat([r.evaluations for r in runs]).tolist()
        score = torch.where(torch.isfinite(final), final, torch.full_like(final, float("inf")))
        score = torch.where(discarded, score + 1e30, score)  # discarded ones only as last resort
        best = int(score.argmin())
        chosen = logits[best].argmax(dim=-1) if optimize_labels else torch.as_tensor(labels)
        stops = {r.stopped for r in runs}
        return Reconstruction(
            images=images[best].detach().cpu(),
            labels=chosen.long().cpu(),
            loss_history=histories[best],
            per_restart_loss=final.tolist(),
            iterations=iterations[best],
            seconds=seconds,
            restart=best,
            discarded=[i for i, d in enumerate(discarded.tolist()) if d],
            resets=sum(r.resets for r in runs),
            evaluations=sum(evaluations),
            per_restart_iterations=iterations,
            per_restart_evaluations=evaluations,
            stopped=next((s for s in ("callback", "converged") if s in stops), "budget"),
        )


class DLG(OptimizationAttack):
    """Deep Leakage from Gradients (Zhu et al., NeurIPS'19): L-BFGS (lr 1, history 100, 20
    inner iterations per step) on the squared L2 distance, jointly over dummy images and soft
    labels (softmax of free logits), unconstrained inputs, 300 steps, as the reference code."""

    name = "dlg"
    preset = InversionConfig(
        optimizer="lbfgs",
        lr=1.0,
        iterations=300,
        distance="l2",
        labels="optimize",
        clamp=False,
        lr_decay=False,
        restarts=1,
    )


class IDLG(DLG):
    """iDLG (Zhao et al., 2020): DLG with the label fixed by the closed form of ``labels.py``
    (recover_labels beyond batch size 1), and an objective L-BFGS can finish on every image.

    DLG's L2 distance is divided by the observed update's energy (``relative``), and with one
    image under FedSGD the simulation backpropagates the observed size of ``p - y``
    (``seed="auto"``, see ``_Simulator``). torch's L-BFGS thresholds are absolute and were
    right for DLG's objective at its usual size (squared update norm ~10^3 on the sigmoid
    LeNet), so on the relative objective they are 10^3 smaller. With the defaults, a victim
    the model classifies confidently has an update energy near 0.25 and L-BFGS stopped
    storing curvature pairs (``y.s < 1e-10``) long before the image converged. Measured on two
    such held-out CIFAR-10 images (norms 0.52 and 0.46), 300 steps: 22.7 / 17.8 dB before,
    55.4 / 49.4 dB now; images with usual norms are unchanged (53.2 / 42.0 dB vs 53.7 / 42.0).

    Random starts closer to mid-grey (``init_scale`` 0.25 instead of DLG's 1): the sigmoids
    start near their linear range, where the gradient says most about the input. Measured on
    held-out images 78 / 303 / 375 / 623, one restart: L-BFGS steps to 30 dB 45 / 79 / 52 / 41
    with 1, 30 / 64 / 34 / 20 with 0.25 (0.1: 29 / 61 / 33 / 17), final PSNR within 2 dB.
    """

    name = "idlg"
    preset = replace(
        DLG.preset,
        labels="recover",
        relative=True,
        seed="auto",
        lbfgs_tolerance_grad=1e-10,
        lbfgs_tolerance_change=1e-12,
        lbfgs_curvature=1e-13,
        init_scale=0.25,
    )


class InvertingGradients(OptimizationAttack):
    """Inverting Gradients (Geiping et al., NeurIPS'20): Adam lr 0.1, decayed x0.1 at 3/8, 5/8
    and 7/8 of 4800 iterations, 1 - cosine similarity + total variation, inputs clamped to the
    image range, known or recovered labels, best of several restarts by final loss.

    Adam's second-moment decay is 0.99 instead of torch's 0.999. The gradient distance falls by
    orders of magnitude during the search, and with 0.999 Adam divides every step by gradients
    remembered from ~1000 steps earlier, so it crawls long before the learning-rate schedule
    ends. Measured on the sigmoid LeNet fed [0, 1], batch 1, held-out CIFAR-10 test images 78 /
    373 / 303 / 623, one restart, 4800 iterations: 0.999 gave 30.1 / 23.6 dB (78 and 373, best
    of four restarts), 0.99 gives 33.8 / 32.9 / 34.4 / 32.8 dB (0.9: 33.9 / 33.6 / 34.4 / 32.8).

    TV weight 1e-4, chosen by measurement (same setting, images 78 / 373, one restart): with
    0.999, 1e-5 gave 21.3 / 19.4 dB, 3e-4 30.4 / 28.2 and 1e-3 27.3 / 29.2 (the prior's
    smoothing caps PSNR); with 0.99, 1e-5 gives 26.0 / 24.1 and 3e-5 32.2 / 26.5 (gradient
    matching alone leaves high-frequency noise). Four restarts; the papers do not fix a number
    (GIAS picks the best of several by final loss).
    """

    name = "inverting-gradients"
    preset = InversionConfig(
        optimizer="adam",
        lr=0.1,
        iterations=4800,
        lr_decay=True,
        adam_betas=(0.9, 0.99),
        distance="cosine",
        tv_weight=1e-4,
        labels="recover",
        restarts=4,
        clamp=True,
    )
