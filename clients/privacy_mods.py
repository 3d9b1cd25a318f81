"""Client mods that protect an honest client's update before it leaves the node.

- ``local_dp_mod``: Flower's own ``LocalDpMod`` (clip the update to a norm, add Gaussian noise
  for (epsilon, delta)), configured from the run config instead of at import time.
- ``update_defense_mod``: the sweepable transforms of ``fedleak/defenses.py`` (top-k per layer,
  Gaussian noise, norm clipping) on the update new - old.

An adversarial node runs its own software and does not protect itself: both mods skip it.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable

from fedleak import protocol
from fedleak.defenses import apply_defenses, parse_defenses
from fedleak.settings.flower import from_run_config, node_identity


def _applies(msg: Message, context: Context) -> bool:
    if msg.metadata.message_type != "train":
        return False
    if node_identity(context.node_config, context.run_config).spec.is_attacker:
        return False
    config = msg.content.config_records.get(protocol.CONFIG)
    # The collaborative protocol uploads sparse deltas with its own DP (collaborative_mod).
    return config is not None and config.get("protocol") != "collaborative"


def local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    defense = from_run_config(context.run_config).defense
    if defense.local_dp_epsilon <= 0 or not _applies(msg, context):
        return call_next(msg, context)
    mod = LocalDpMod(
        clipping_norm=defense.local_dp_clip,
        sensitivity=defense.local_dp_clip,
        epsilon=defense.local_dp_epsilon,
        delta=defense.local_dp_delta,
    )
    return mod(msg, context, call_next)


def update_defense_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    settings = from_run_config(context.run_config)
    if settings.defense.client == "none" or not _applies(msg, context):
        return call_next(msg, context)
    specs = parse_defenses(settings.defense.client)
    sent = msg.content.array_records[protocol.ARRAYS]
    keys, before = list(sent.keys()), sent.to_numpy_ndarrays()
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    after = reply.content.array_records[protocol.ARRAYS].to_numpy_ndarrays()
    update = [
        torch.from_numpy(np.asarray(a - b, dtype=np.float32))
        for a, b in zip(after, before, strict=True)
    ]
    seed = settings.run.seed * 7919 + context.node_id % 7919
    rng = torch.Generator().manual_seed(
        seed + int(msg.content.config_records[protocol.CONFIG]["server-round"])
    )
    defended = apply_defenses(update, specs, rng)
    reply.content[protocol.ARRAYS] = ArrayRecord(
        {
            k: Array(np.ascontiguousarray(b + d.numpy().astype(b.dtype)))
            for k, b, d in zip(keys, before, defended, strict=True)
        }
    )
    return reply
