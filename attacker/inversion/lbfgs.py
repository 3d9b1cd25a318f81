"""L-BFGS on R independent problems at once: the restarts of an attack, run together.

Why not ``torch.optim.LBFGS``: it treats everything it optimises as one vector, so R restarts
handed to it would share one curvature history, one step length and one stopping decision: a
different algorithm from R separate runs, where a stalled restart drags the others along.
Running them one after another keeps them apart but pays the per-evaluation overhead R times,
and that overhead dominates for the small models gradient inversion attacks (a sigmoid LeNet's
gradient-of-gradient is a few hundred microseconds of arithmetic behind milliseconds of
dispatch).

Here every piece of L-BFGS state carries a leading restart dimension: the history pairs (a ring
buffer per restart, since each restart accepts or skips a pair on its own), the initial Hessian
scale, the direction, the step length, the iteration counters and the stopping flags. One call
of the objective evaluates all R points (the attack ``vmap``s its simulation), and every update
is masked per restart, so restart r follows exactly the iterates it would follow alone.

Per restart the algorithm is ``torch.optim.LBFGS``'s (the one DLG's reference code runs), with
the same defaults (tested to agree iterate for iterate): a ``step`` is up to ``max_iter`` inner
iterations, the first direction is ``-g`` with step ``min(1, 1/|g|_1) * lr``, later ones
``lr``; an inner loop ends early when the directional derivative, the step or the loss change
falls below ``tolerance_change`` or the largest gradient entry below ``tolerance_grad``, and a
pair is stored only if ``y.s`` exceeds ``curvature_min``. These thresholds are absolute: an
objective a thousand times smaller needs them a thousand times smaller, or L-BFGS stops
storing curvature and stalls (see ``IDLG`` in ``attacks.py``).

``line_search="none"`` takes the fixed step, as torch does without a line search.
``"backtracking"`` halves each restart's own step until the Armijo condition
``f(x + t d) <= f(x) + c t g.d`` holds, so no restart can jump uphill (a fixed step of 1 can
throw a sigmoid network's input into its flat tails); a restart that finds no decreasing step
ends its inner loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

# (R, n) points and an (R,) mask -> (R,) objective values and their (R, n) gradients, every
# restart independent; rows outside the mask are not needed (the caller may skip them).
Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LBFGSOptions:
    """Per-restart settings; the defaults are ``torch.optim.LBFGS``'s."""

    lr: float = 1.0
    max_iter: int = 20
    history: int = 100
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    curvature_min: float = 1e-10  # a pair (s, y) is stored only if y.s exceeds this
    line_search: Literal["none", "backtracking"] = "none"
    max_backtracks: int = 10
    armijo: float = 1e-4

    def __post_init__(self) -> None:
        if self.line_search not in ("none", "backtracking"):
            raise ValueError(f"line_search must be none or backtracking, got {self.line_search!r}")
        if self.max_iter < 1 or self.history < 1:
            raise ValueError("max_iter and history must be >= 1")


def _dots(vectors: Tensor, v: Tensor) -> Tensor:
    """(R, m): each restart's stored vectors (R, m, n) dotted with its v (R, n).

    As (R, 1, n) @ (R, n, m): the (R, m, n) @ (R, n, 1) form of the same product runs ~15x
    slower on CPU for R = 8 (torch 2.14, one thread).
    """
    return torch.bmm(v[:, None, :], vectors.transpose(1, 2)).squeeze(1)


def _rows(mask: Tensor, values: Tensor) -> Tensor:
    """``mask`` (R,) broadcast against ``values`` (R, ...)."""
    return mask.view(-1, *([1] * (values.ndim - 1)))


class BatchedLBFGS:
    """L-BFGS state for R problems whose points are the rows of ``x`` (R x n, float)."""

    def __init__(self, x: Tensor, options: LBFGSOptions) -> None:
        if x.ndim != 2:
            raise ValueError(f"points must be R x n, got {tuple(x.shape)}")
        self.options = options
        self.x = x.detach().clone()
        r, n = x.shape
        m = options.history
        self._rows = torch.arange(r, device=x.device)
        self.s = x.new_zeros(r, m, n)  # ring buffers of the steps s = t d ...
        self.y = x.new_zeros(r, m, n)  # ... and gradient changes y = g_new - g_old
        self.rho = x.new_zeros(r, m)  # 1 / (y.s) of each stored pair
        self.sy = x.new_zeros(r, m, m)  # s_i . y_j between the stored pairs, by slot
        self.s_g = x.new_zeros(r, m)  # S^T g and Y^T d of each restart's last direction
        self.y_d = x.new_zeros(r, m)
        self.head = torch.zeros(r, dtype=torch.long, device=x.device)  # next slot to write
        self.count = torch.zeros(r, dtype=torch.long, device=x.device)  # pairs stored
        self.h_diag = x.new_ones(r)
        self.d = x.new_zeros(r, n)
        self.t = x.new_zeros(r)
        self.prev_g = x.new_zeros(r, n)
        self.prev_loss = x.new_zeros(r)
        self.n_iter = torch.zeros(r, dtype=torch.long, device=x.device)  # inner iterations
        self.evaluations = torch.zeros(r, dtype=torch.long, device=x.device)

    def reset(self, mask: Tensor, x: Tensor) -> None:
        """Start the restarts in ``mask`` afresh from the rows of ``x`` (history cleared).

        Their buffers are zeroed too: a diverged restart may have left non-finite pairs, and
        an unused slot enters the arithmetic multiplied by 0, which turns ``inf`` into NaN.
        """
        self.x = torch.where(_rows(mask, self.x), x.to(self.x), self.x)
        self.count = torch.where(mask, 0, self.count)
        for name in ("s", "y", "rho", "sy", "s_g", "y_d"):
            buffer = getattr(self, name)
            setattr(self, name, torch.where(_rows(mask, buffer), 0.0, buffer))
        self.h_diag = torch.where(mask, 1.0, self.h_diag)
        self.n_iter = torch.where(mask, 0, self.n_iter)

    def keep(self, mask: Tensor) -> None:
        """Drop the restarts outside ``mask`` for good (the rows left keep their order).

        A finished restart would otherwise still be carried through every step: its history
        is read in each direction computation, which costs as much as a live one's.
        """
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor) and name != "_rows" and value.shape[:1] == mask.shape:
                setattr(self, name, value[mask])
        self._rows = torch.arange(int(mask.sum()), device=mask.device)

    def _direction(self, g: Tensor, later: Tensor) -> Tensor:
        """``-H g`` for the restarts in ``later`` (their second or later inner iteration).

        The two-loop recursion, written as two unit-triangular solves: the first loop (newest
        pair first) is ``alpha_t = rho_t s_t.(g - sum_{u>t} alpha_u y_u)``, i.e.
        ``(I + diag(rho) U) alpha = rho * S^T g`` with ``U`` the strictly upper part of ``S^T Y``
        in time order; the second (oldest first) is ``(I + diag(rho) L) beta = rho * (Y^T r0 +
        L alpha)`` with ``L`` the strictly lower part of ``Y^T S``, ``r0 = gamma (g - Y alpha)``,
        and ``H g = r0 + S (alpha - beta)``. The same arithmetic as the loops (forward
        substitution is the recursion) in a handful of batched kernels instead of four small
        ones per stored pair, which cost more than a small network's objective. The work left
        is reading the stored pairs: four passes (``S^T g``, ``Y alpha``, ``Y^T r0``,
        ``S (alpha - beta)``), since ``S^T Y`` is updated from products already at hand.
        """
        s_g = self._remember(g, later)
        m = self.options.history
        used = int(self.count.max())
        if used == 0:
            return -g * self.h_diag[:, None]
        # Each restart's newest ``used`` slots, oldest first; unfilled ones have rho = 0.
        order = (self.head[:, None] + torch.arange(m - used, m, device=g.device)) % m
        rows = self._rows[:, None]
        rho = self.rho[rows, order]
        sy = self.sy[rows[..., None], order[:, :, None], order[:, None, :]]  # s_a . y_b
        upper = rho[..., None] * sy.triu(1)
        alpha = torch.linalg.solve_triangular(
            upper, (rho * s_g[rows, order])[..., None], upper=True, unitriangular=True
        ).squeeze(-1)
        r0 = (g - self._combine(self.y, order, alpha)) * self.h_diag[:, None]
        lower = sy.transpose(1, 2).tril(-1)  # y_t . s_u for u older than t
        y_r0 = _dots(self.y, r0)
        rhs = rho * (y_r0[rows, order] + torch.bmm(lower, alpha[..., None]).squeeze(-1))
        beta = torch.linalg.solve_triangular(
            rho[..., None] * lower, rhs[..., None], upper=False, unitriangular=True
        ).squeeze(-1)
        spread = self._spread(order, alpha - beta)
        d = -(r0 + torch.bmm(spread[:, None, :], self.s).squeeze(1))
        # Y^T d = -(Y^T r0 + (S^T Y)^T (alpha - beta)), kept for the next pair's row of S^T Y.
        y_d = -(y_r0 + torch.bmm(spread[:, None, :], self.sy).squeeze(1))
        self.s_g = torch.where(_rows(later, s_g), s_g, self.s_g)
        self.y_d = torch.where(_rows(later, y_d), y_d, self.y_d)
        return d

    def _spread(self, order: Tensor, coefficients: Tensor) -> Tensor:
        """(R, m) slot coefficients from (R, used) ones in ``order`` (0 elsewhere)."""
        full = coefficients.new_zeros(self.rho.shape)
        full[self._rows[:, None], order] = coefficients
        return full

    def _combine(self, vectors: Tensor, order: Tensor, coefficients: Tensor) -> Tensor:
        """Per restart r: the sum over t of ``coefficients[r, t] * vectors[r, order[r, t]]``."""
        return torch.bmm(self._spread(order, coefficients)[:, None, :], vectors).squeeze(1)

    def _remember(self, g: Tensor, running: Tensor) -> Tensor:
        """Store the last step's pair for the running restarts whose curvature is positive;
        returns ``S^T g`` (by slot) after the store.

        The new slot j's column of ``S^T Y`` is ``S^T g - S^T g_old`` (``S^T g_old`` kept from
        the last direction, its entry j recomputed for the new s) and its row is
        ``t (Y^T d)`` from the last direction, so no extra pass over the buffers is needed.
        """
        y = g - self.prev_g
        s = self.d * self.t[:, None]
        ys = (y * s).sum(1)
        keep = running & (ys > self.options.curvature_min)
        rows, slot = self._rows[keep], self.head[keep]
        if len(rows):
            self.s[rows, slot] = s[keep]
            self.y[rows, slot] = y[keep]
            self.rho[rows, slot] = 1.0 / ys[keep]
        s_g = _dots(self.s, g)
        if len(rows):
            old = self.s_g[rows].clone()
            old[torch.arange(len(rows), device=g.device), slot] = (s * self.prev_g).sum(1)[keep]
            row = self.t[keep, None] * self.y_d[rows]
            row[torch.arange(len(rows), device=g.device), slot] = ys[keep]
            self.sy[rows, :, slot] = s_g[rows] - old
            self.sy[rows, slot, :] = row
            m = self.options.history
            self.head = torch.where(keep, (self.head + 1) % m, self.head)
            self.count = torch.where(keep, (self.count + 1).clamp_max(m), self.count)
            self.h_diag = torch.where(keep, ys / (y * y).sum(1), self.h_diag)
        return s_g

    def step(self, objective: Objective, active: Tensor) -> Tensor:
        """One L-BFGS step (up to ``max_iter`` inner iterations) for the restarts in ``active``.

        Returns the objective at each active restart's point before the step (what
        ``opt.step`` returns); restarts not in ``active`` are not evaluated and do not move.
        """
        opt = self.options
        loss, g = objective(self.x, active)
        before = loss.clone()
        self.evaluations += active.long()
        running = active & (g.abs().amax(1) > opt.tolerance_grad)
        for inner in range(1, opt.max_iter + 1):
            if not running.any():
                break
            self.n_iter += running.long()
            first = self.n_iter == 1
            later = running & ~first
            d = self._direction(g, later) if later.any() else -g
            self.d = torch.where(_rows(running, d), torch.where(_rows(first, d), -g, d), self.d)
            self.prev_g = torch.where(_rows(running, g), g, self.prev_g)
            self.prev_loss = torch.where(running, loss, self.prev_loss)
            first_t = (1.0 / g.abs().sum(1)).clamp_max(1.0) * opt.lr
            self.t = torch.where(running, torch.where(first, first_t, opt.lr), self.t)
            gtd = (g * self.d).sum(1)
            running = running & ~(gtd > -opt.tolerance_change)
            if opt.line_search == "backtracking":
                loss, g, running = self._backtrack(objective, loss, g, gtd, running)
            else:
                moved_x = self.x + self.t[:, None] * self.d
                self.x = torch.where(_rows(running, self.x), moved_x, self.x)
                if inner == opt.max_iter:
                    break  # torch evaluates the new point at the next step, not here
                new_loss, new_g = objective(self.x, running)
                self.evaluations += running.long()
                loss = torch.where(running, new_loss, loss)
                g = torch.where(_rows(running, g), new_g, g)
            moved = (self.d * self.t[:, None]).abs().amax(1)
            running = (
                running
                & (g.abs().amax(1) > opt.tolerance_grad)
                & (moved > opt.tolerance_change)
                & ((loss - self.prev_loss).abs() >= opt.tolerance_change)
            )
        return before

    def _backtrack(
        self, objective: Objective, loss: Tensor, g: Tensor, gtd: Tensor, running: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Armijo backtracking, each restart with its own step; a failed search ends its loop."""
        opt = self.options
        searching = running.clone()
        for _ in range(opt.max_backtracks + 1):
            trial = torch.where(_rows(searching, self.x), self.x + self.t[:, None] * self.d, self.x)
            new_loss, new_g = objective(trial, searching)
            self.evaluations += searching.long()
            ok = searching & torch.isfinite(new_loss)
            ok &= new_loss <= loss + opt.armijo * self.t * gtd
            self.x = torch.where(_rows(ok, trial), trial, self.x)
            loss = torch.where(ok, new_loss, loss)
            g = torch.where(_rows(ok, g), new_g, g)
            searching &= ~ok
            if not searching.any():
                break
            self.t = torch.where(searching, self.t / 2, self.t)
        return loss, g, running & ~searching
