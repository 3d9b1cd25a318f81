"""Where the attacker's generator lives between turns: a state folder on the attacker's own
machine (survives a SuperNode restart) or, without one, the SuperNode's in-memory node state."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from torch import nn

NODE_STATE_KEY = "attacker.generator"
TURNS_KEY = "attacker.generator-turns"  # one RecordDict key space across record types
FILE_NAME = "generator.pt"


class GeneratorStore:
    def __init__(self, context: Context, state_dir: str | None) -> None:
        self.context = context
        self.path = Path(state_dir) / FILE_NAME if state_dir else None

    def load(self, generator: nn.Module) -> int:
        """Restore G in place; returns how many turns it has trained (0 if new)."""
        if self.path is not None and self.path.exists():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            generator.load_state_dict(saved["generator"])
            return int(saved["turns"])
        record = self.context.state.array_records.get(NODE_STATE_KEY)
        if record is not None:
            generator.load_state_dict(record.to_torch_state_dict())
            turns = self.context.state.config_records.get(TURNS_KEY)
            return int(turns["turns"]) if turns is not None else 0
        return 0

    def save(self, generator: nn.Module, turns: int) -> None:
        from flwr.app import ConfigRecord

        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save({"generator": generator.state_dict(), "turns": turns}, tmp)
            os.replace(tmp, self.path)
        else:
            self.context.state[NODE_STATE_KEY] = ArrayRecord(generator.state_dict())
            self.context.state[TURNS_KEY] = ConfigRecord({"turns": turns})
