"""What an inversion attacker reports: ``federated_inversion.invert``'s result as a typed
:class:`~fedleak.records.ReconstructionReport` (or the reason it failed)."""

from __future__ import annotations

from typing import Any

from fedleak.records import ReconstructionReport


def reconstruction_report(result: dict[str, Any], **where: Any) -> ReconstructionReport:
    """``where``: threat, round, attacker or node, isolated, update_norm, device."""
    history = [float(v) for v in result.get("loss_history", [])]
    return ReconstructionReport(
        attack=str(result.get("attack", "")),
        update=str(result.get("kind", "")),
        batch_size=int(result.get("batch_size", 0)),
        local_steps=int(result.get("local_steps", 1)),
        images=result["images"].numpy(),
        labels=result["labels"].numpy(),
        loss_history=history,
        seconds=float(result.get("seconds", 0.0)),
        iterations=int(result.get("iterations", len(history))),
        evaluations=result.get("evaluations"),
        restart=result.get("restart"),
        per_restart_loss=[float(v) for v in result.get("per_restart_loss", [])],
        per_restart_iterations=[int(v) for v in result.get("per_restart_iterations", [])],
        per_restart_evaluations=[int(v) for v in result.get("per_restart_evaluations", [])],
        discarded=[int(v) for v in result.get("discarded", [])],
        stopped=str(result.get("stopped", "")),
        backward_seed=str(result.get("seed", "")),
        **where,
    )


def failure_report(err: Exception, **where: Any) -> ReconstructionReport:
    return ReconstructionReport(error=f"{type(err).__name__}: {err}", **where)
