"""Gradient inversion inside a real federation: turn what a role saw into an Observation, invert it,
and keep the reconstruction on the attacker's own side.

Two threat models share this module:

- the adversarial client (``isolate_others``): it sees consecutive global models. FedAvg weighs
  every reply by its example count; every client declares the same count (the agreed batch) and
  the server declares the cohort size K, so ``K * (new global - old global) - own update`` is the
  sum of the other clients' updates: exactly the victim's with one victim, the aggregate of the
  others with several (the report says which).
- the curious server (``server.curious``): each reply minus the model it sent is one client's
  individual update.

Only protocol facts enter: parameters, updates and the declared batch size, local steps and
learning rate. The private images never do; the testbed scores the saved reconstruction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedleak.attacker.inversion import Observation, get_attack
from fedleak.attacker.inversion.attacks import Callback
from fedleak.runfolder import atomic_torch_save


@dataclass(frozen=True)
class Protocol:
    """The training procedure every client declared (the server's train config)."""

    kind: str  # "fedsgd" | "fedavg"
    lr: float
    batch_size: int  # examples per FedSGD step / per local FedAvg step
    examples: int  # examples behind one client's update
    local_steps: int
    num_classes: int
    image_shape: tuple[int, int, int]

    @classmethod
    def from_config(
        cls, config: Any, num_classes: int, image_shape: tuple[int, int, int]
    ) -> Protocol:
        kind = str(config["protocol"])
        batch = int(config["batch-size"])
        if kind == "fedsgd":
            return cls("fedsgd", float(config["lr"]), batch, batch, 1, num_classes, image_shape)
        return cls(
            "fedavg",
            float(config["lr"]),
            batch,
            int(config["examples-per-round"]),
            int(config["local-batches"]),
            num_classes,
            image_shape,
        )


def _params(record: ArrayRecord, names: list[str]) -> list[torch.Tensor]:
    state = record.to_torch_state_dict()
    return [state[n].float() for n in names]


def observation_from_update(
    sent: ArrayRecord,
    update: list[torch.Tensor],
    protocol: Protocol,
    clients: int = 1,
) -> Observation:
    """The Observation of ``update`` (new - old, per trainable parameter) at model ``sent``.

    ``clients`` > 1: the update is the sum of that many clients' updates of ``protocol.examples``
    examples each; their mean is inverted as one client holding all their examples (exact for
    FedSGD, an approximation for multi-step FedAvg).
    """
    state = sent.to_torch_state_dict()
    mean = [u / clients for u in update]
    examples = protocol.examples * clients
    shape = protocol.image_shape
    if protocol.kind == "fedsgd":
        return Observation(
            update=[-u / protocol.lr for u in mean],
            kind="fedsgd",
            batch_size=examples,
            local_steps=1,
            local_lr=0.0,
            num_classes=protocol.num_classes,
            image_shape=shape,
            model_state=state,
        )
    return Observation(
        update=mean,
        kind="fedavg",
        batch_size=examples,
        local_steps=protocol.local_steps,
        local_lr=protocol.lr,
        num_classes=protocol.num_classes,
        image_shape=shape,
        model_state=state,
        local_batch_size=protocol.batch_size if clients == 1 else protocol.batch_size * clients,
    )


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def individual_update(
    model: torch.nn.Module, sent: ArrayRecord, reply: ArrayRecord
) -> list[torch.Tensor]:
    """What one client changed: its reply minus the model it was sent."""
    names = trainable_names(model)
    return [r - s for r, s in zip(_params(reply, names), _params(sent, names), strict=True)]


def isolate_others(
    model: torch.nn.Module,
    old_global: ArrayRecord,
    new_global: ArrayRecord,
    own_update: list[torch.Tensor],
    cohort: int,
) -> list[torch.Tensor]:
    """The sum of the other clients' updates: ``K * (new - old) - own`` under FedAvg with equal
    declared example counts."""
    names = trainable_names(model)
    change = [
        n - o for n, o in zip(_params(new_global, names), _params(old_global, names), strict=True)
    ]
    return [cohort * c - u for c, u in zip(change, own_update, strict=True)]


# The federation's stopping rule (the library's, see InversionConfig): the restarts run together
# and after every L-BFGS step the worse half by gradient distance stops, so four restarts cost
# about four extra steps of one; a restart whose best distance fell by less than 1% over the
# last 10 steps has converged and stops. An earlier rule stopped every restart once the
# distance fell below 1e-8 of the update's energy and cost about 6 dB: the image keeps
# sharpening well below that. A stall costs at most what the window could still have gained.
STOPPING = {"stall_window": 10, "stall_tolerance": 1e-2, "prune_every": 1}

# What a saved record reports about the work the attack did (Reconstruction's fields).
WORK_FIELDS = (
    "iterations",
    "evaluations",
    "restart",
    "per_restart_loss",
    "per_restart_iterations",
    "per_restart_evaluations",
    "discarded",
    "resets",
    "stopped",
    "seed",
)


def stopping_for(attack: str) -> dict[str, Any]:
    """The stopping rule's options for ``attack``: L-BFGS attacks only (Adam follows its
    learning-rate schedule to the end)."""
    probe = get_attack(attack)
    if getattr(probe.config, "optimizer", None) != "lbfgs":
        return {}
    return dict(STOPPING)


def invert(
    model: torch.nn.Module,
    observation: Observation,
    attack: str,
    iterations: int = 0,
    restarts: int = 0,
    seed: int = 0,
    threads: int = 1,
    callback: Callback | None = None,
) -> dict[str, Any]:
    """Run the named attack; returns what is saved (images in the data range, labels, curves,
    and the work done: ``WORK_FIELDS`` and ``seconds``, the wall time).

    ``threads``: torch threads while it runs. One by default: the roles share their machine
    with the federation's other processes, and oversubscribed threads cost far more than they
    bring for a model this small. ``callback`` is the attack's (benchmarks watch it).
    """
    overrides = stopping_for(attack)
    if iterations > 0:
        overrides["iterations"] = iterations
    if restarts > 0:
        overrides["restarts"] = restarts
    if not all(torch.isfinite(u).all() for u in observation.update):
        raise ValueError("the observed update is not finite")
    start = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = get_attack(attack, **overrides).reconstruct(
            model, observation, generator=torch.Generator().manual_seed(seed), callback=callback
        )
    finally:
        torch.set_num_threads(before)
    record = {
        "images": result.images.detach().cpu(),
        "labels": result.labels.detach().cpu(),
        "loss_history": [float(v) for v in result.loss_history],
        "seconds": time.perf_counter() - start,
        "attack": attack,
        "kind": observation.kind,
        "batch_size": observation.batch_size,
        "local_steps": observation.local_steps,
    }
    record.update({key: getattr(result, key) for key in WORK_FIELDS})
    return record


def save_reconstruction(folder: str | Path, name: str, record: dict[str, Any]) -> Path:
    return atomic_torch_save(record, Path(folder) / f"{name}.pt")


def update_norm(update: list[torch.Tensor]) -> float:
    return float(np.sqrt(sum(float((u.double() ** 2).sum()) for u in update)))
