"""The testbed's central measurement of the shared model after every round.

This is the experimenter's view, not a federation role: it reads the real test set and writes
`metrics.jsonl` and the latest global model into the run folder.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord

from fedleak.data import load_dataset
from fedleak.metrics.classification import class_rates
from fedleak.models import build_classifier
from fedleak.runfolder import RunFolder

FINAL_MODEL = "final-model.pt"


class CentralEvaluation:
    """`evaluate_fn` for Flower's strategy loop; also records what the strategy saw."""

    def __init__(self, cfg: dict[str, Any], run: RunFolder, strategy: Any) -> None:
        self.cfg = cfg
        self.run = run
        self.strategy = strategy
        self.model = build_classifier(cfg["model"]["name"], cfg["model"]["num-classes"])
        test = load_dataset(cfg["data"]["dataset"], "test", cfg["data"]["root"] or None)
        self.test = test
        self.target = test.of_classes([cfg["eval"]["target-class"]])
        self.started = time.monotonic()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        self.model.eval()
        fake = self.cfg["eval"]["fake-class"]
        overall = class_rates(self.model, self.test.images, self.test.labels, fake_class=fake)
        on_target = class_rates(self.model, self.target.images, self.target.labels, fake_class=fake)
        record: dict[str, Any] = {
            "round": server_round,
            "time": round(time.monotonic() - self.started, 2),
            "test_accuracy": overall["accuracy"],
            "test_to_fake": on_target["to_fake"],
            "target_accuracy": on_target["accuracy"],
        }
        if server_round > 0:
            record.update(self.strategy.last_round)
        self.run.append_jsonl("metrics.jsonl", record)
        self._save_model()
        return MetricRecord(
            {"test-accuracy": overall["accuracy"], "test-to-fake": on_target["to_fake"]}
        )

    def _save_model(self) -> None:
        path = self.run.path / FINAL_MODEL
        tmp = path.with_suffix(".tmp")
        torch.save(self.model.state_dict(), tmp)
        os.replace(tmp, path)
