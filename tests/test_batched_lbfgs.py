"""The batched L-BFGS (attacker/inversion/lbfgs.py): each restart is torch's L-BFGS, alone."""

from __future__ import annotations

import pytest
import torch

from fedleak.attacker.inversion.lbfgs import BatchedLBFGS, LBFGSOptions


def _problem(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A smooth non-quadratic objective: sum of softplus(A x - b) plus a small quartic term."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(20, n, generator=gen, dtype=torch.float64)
    b = torch.randn(20, generator=gen, dtype=torch.float64)
    x0 = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    return a, b, x0


def _value(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(a @ x - b).sum() + 0.01 * x.pow(4).sum()


def _batched_objective(problems):
    calls = []

    def objective(z: torch.Tensor, rows: torch.Tensor):
        calls.append(rows.clone())
        z = z.detach().requires_grad_(True)
        values = torch.stack([_value(a, b, zi) for (a, b, _), zi in zip(problems, z, strict=True)])
        (grad,) = torch.autograd.grad(values.sum(), z)
        return values.detach(), grad

    return objective, calls


def _torch_lbfgs(a, b, x0, steps: int, **options) -> tuple[torch.Tensor, list[float]]:
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], **options)

    def closure():
        opt.zero_grad()
        loss = _value(a, b, x)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(steps)]
    return x.detach(), losses


@pytest.mark.parametrize("history", [100, 3])  # 3: the ring buffer wraps around
def test_each_restart_follows_torchs_lbfgs(history):
    problems = [_problem(seed) for seed in range(3)]
    objective, _ = _batched_objective(problems)
    opt = BatchedLBFGS(torch.stack([x0 for *_, x0 in problems]), LBFGSOptions(history=history))
    active = torch.ones(3, dtype=torch.bool)
    batched = [opt.step(objective, active).tolist() for _ in range(4)]
    for r, (a, b, x0) in enumerate(problems):
        x, losses = _torch_lbfgs(a, b, x0, 4, history_size=history)
        assert torch.allclose(opt.x[r], x, rtol=1e-9, atol=1e-10)
        assert [step[r] for step in batched] == pytest.approx(losses, rel=1e-10)
    assert (opt.x[0] - problems[0][2]).abs().max() > 0.1  # it did move


def test_inactive_restarts_do_not_move_and_are_not_evaluated_as_running():
    problems = [_problem(seed) for seed in range(2)]
    objective, calls = _batched_objective(problems)
    start = torch.stack([x0 for *_, x0 in problems])
    opt = BatchedLBFGS(start, LBFGSOptions(max_iter=5))
    opt.step(objective, torch.tensor([True, False]))
    assert torch.equal(opt.x[1], start[1]) and not torch.equal(opt.x[0], start[0])
    assert opt.evaluations.tolist() == [5, 0]
    assert all(not bool(rows[1]) for rows in calls)
    # Restart 1 alone afterwards is restart 1 as if it had always been alone.
    opt.step(objective, torch.tensor([False, True]))
    x, _ = _torch_lbfgs(*problems[1][:2], problems[1][2], 1, max_iter=5)
    assert torch.allclose(opt.x[1], x, rtol=1e-9, atol=1e-10)


def test_reset_clears_one_restarts_history_only():
    problems = [_problem(seed) for seed in range(2)]
    objective, _ = _batched_objective(problems)
    start = torch.stack([x0 for *_, x0 in problems])
    opt = BatchedLBFGS(start, LBFGSOptions(max_iter=5))
    both = torch.ones(2, dtype=torch.bool)
    opt.step(objective, both)
    opt.reset(torch.tensor([True, False]), start)
    assert opt.count.tolist()[0] == 0 and opt.count.tolist()[1] > 0
    opt.step(objective, both)
    x0, _ = _torch_lbfgs(*problems[0][:2], problems[0][2], 1, max_iter=5)
    x1, _ = _torch_lbfgs(*problems[1][:2], problems[1][2], 2, max_iter=5)
    assert torch.allclose(opt.x[0], x0, rtol=1e-9, atol=1e-10)
    assert torch.allclose(opt.x[1], x1, rtol=1e-9, atol=1e-10)


def test_backtracking_decreases_every_restart_monotonically():
    problems = [_problem(seed) for seed in range(3)]
    objective, _ = _batched_objective(problems)
    opt = BatchedLBFGS(
        torch.stack([x0 for *_, x0 in problems]),
        LBFGSOptions(lr=4.0, line_search="backtracking"),  # steps of 4 must be cut back
    )
    active = torch.ones(3, dtype=torch.bool)
    losses = torch.stack([opt.step(objective, active) for _ in range(5)])
    assert (losses[1:] <= losses[:-1] + 1e-12).all()
    assert (losses[-1] < 0.5 * losses[0]).all()


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="line_search"):
        LBFGSOptions(line_search="wolfe")
    with pytest.raises(ValueError, match="R x n"):
        BatchedLBFGS(torch.zeros(3), LBFGSOptions())
