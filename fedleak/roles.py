"""Which code runs for which role: the only place where the roles meet.

The ClientApp looks up a participant's handler here by role and attack mode; the ServerApp looks
up the strategy wrappers its settings ask for. They are named by module path and imported when
used, so no role package imports another, and an honest node never loads attack code.
"""

from __future__ import annotations

import importlib
from typing import Any

# (role, attack mode) -> "module:function" taking (msg, context, identity, settings)
CLIENT_HANDLERS: dict[tuple[str, str | None], str] = {
    ("honest", None): "fedleak.clients.honest:train",
    ("attacker", "active"): "fedleak.attacker.gan:train",
    ("attacker", "passive"): "fedleak.attacker.gan:train",
    ("attacker", "inversion"): "fedleak.attacker.inversion_client:train",
    ("attacker", "byzantine"): "fedleak.attacker.byzantine:train",
}

# server option -> "module:Class", a Flower strategy wrapper (composed like Flower's DP wrappers)
SERVER_WRAPPERS: dict[str, str] = {
    "curious": "fedleak.attacker.curious_server:CuriousServer",
}


def resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def client_handler(role: str, mode: str | None) -> Any:
    key = (role, mode if role == "attacker" else None)
    if key not in CLIENT_HANDLERS:
        raise ValueError(f"no handler for role {role!r} with mode {mode!r}")
    return resolve(CLIENT_HANDLERS[key])
