"""Client mods that protect an honest client's update before it leaves the node.

- ``local_dp_mod``: Flower's own ``LocalDpMod`` (clip the update to a norm, add Gaussian noise
  for (epsilon, delta)), configured from the run config instead of at import time.
- ``update_defense_mod``: the sweepable transforms of ``clients/defenses.py`` (top-k per layer,
  Gaussian noise, norm clipping) on the update new - old.

An adversarial node runs its own software and does not protect itself: both mods skip it.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable

from fedleak.clients.participant import participant


def _applies(msg: Message, context: Context) -> bool:
    if msg.metadata.message_type != "train" or participant(context).is_attacker:
        return False
    config = msg.content.config_records.get("config")
    # The collaborative protocol uploads sparse deltas with its own DP (collaborative_mod).
    return config is not None and config.get("protocol") != "collaborative"


def local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    epsilon = float(context.run_config.get("defense.local-dp-epsilon", 0.0))
    if epsilon <= 0 or not _applies(msg, context):
        return call_next(msg, context)
    mod = LocalDpMod(
        clipping_norm=float(context.run_config["defense.local-dp-clip"]),
        sensitivity=float(context.run_config["defense.local-dp-clip"]),
        epsilon=epsilon,
        delta=float(context.run_config["defense.local-dp-delta"]),
    )
    return mod(msg, context, call_next)


def update_defense_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    spec = str(context.run_config.get("defense.client", "none"))
    if spec in ("", "none") or not _applies(msg, context):
        return call_next(msg, context)
    from fedleak.clients.defenses import apply_defenses, parse_defenses

    specs = parse_defenses(spec)
    sent = msg.content.array_records["arrays"]
    keys, before = list(sent.keys()), sent.to_numpy_ndarrays()
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    after = reply.content.array_records["arrays"].to_numpy_ndarrays()
    update = [
        torch.from_numpy(np.asarray(a - b, dtype=np.float32))
        for a, b in zip(after, before, strict=True)
    ]
    seed = int(context.run_config["run.seed"]) * 7919 + context.node_id % 7919
    rng = torch.Generator().manual_seed(
        seed + int(msg.content.config_records["config"]["server-round"])
    )
    defended = apply_defenses(update, specs, rng)
    reply.content["arrays"] = ArrayRecord(
        {
            k: Array(np.ascontiguousarray(b + d.numpy().astype(b.dtype)))
            for k, b, d in zip(keys, before, defended, strict=True)
        }
    )
    return reply
