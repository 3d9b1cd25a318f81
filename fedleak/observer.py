"""The experimenter's side of an attack run: score what the attacker produced.

The attacker writes generated images on its own machine; it never sees ground truth. This module
is the only place that compares those images with the victim's real data (breaching's rule:
ground truth goes only to the evaluation), and writes the scores to `attack.jsonl`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fedleak.data import ImageSet, image_shape, load_dataset
from fedleak.metrics.attack import nearest_images, score_generated
from fedleak.models import build_classifier
from fedleak.models.evaluator import get_evaluator
from fedleak.report.grids import save_comparison_grid, save_image_grid
from fedleak.runfolder import RunFolder

log = logging.getLogger(__name__)


def attacker_out_dirs(cfg: dict[str, Any]) -> list[tuple[int, Path]]:
    return [
        (i, Path(p["out-dir"]))
        for i, p in enumerate(cfg["participants"])
        if p["role"] == "attacker" and p.get("mode") != "inversion" and p.get("out-dir")
    ]


class AttackObserver:
    def __init__(self, run: RunFolder, cfg: dict[str, Any]) -> None:
        self.run = run
        self.cfg = cfg
        self.scored = {
            (r.get("attacker"), r.get("round"), r.get("variant"))
            for r in run.read_jsonl("attack.jsonl")
        }
        self._evaluator: torch.nn.Module | None = None
        self._reference: ImageSet | None = None

    @property
    def threshold(self) -> float | None:
        value = self.cfg["eval"]["realism-threshold"]
        return value if value > 0 else None

    def prepare(self) -> None:
        """Load (or train once and cache) the evaluator before the federation competes for
        the CPU with it."""
        if attacker_out_dirs(self.cfg):
            self._ground_truth()

    def _ground_truth(self) -> tuple[torch.nn.Module, ImageSet]:
        if self._evaluator is None:
            data = self.cfg["data"]
            self._evaluator, info = get_evaluator(data["dataset"], data["root"] or None)
            self.run.write_meta(evaluator=info)
            self._reference = load_dataset(data["dataset"], "train", data["root"] or None)
        return self._evaluator, self._reference

    def poll(self) -> list[dict]:
        """Score every sample file not scored yet; returns the new records."""
        new = []
        for index, out_dir in attacker_out_dirs(self.cfg):
            for path in sorted((out_dir / "samples").glob("round-*.pt")):
                try:
                    saved = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as err:  # a file being replaced or damaged: try next poll
                    log.warning("cannot read %s: %s", path, err)
                    continue
                key = (index, int(saved["round"]), str(saved.get("mode", "active")))
                if key in self.scored:
                    continue
                new.append(
                    self._score(saved["images"], index, key[1], key[2], int(saved["target"]))
                )
                self.scored.add(key)
        return new

    def _score(
        self, images: torch.Tensor, attacker: int, server_round: int, variant: str, target: int
    ) -> dict:
        evaluator, reference = self._ground_truth()
        record: dict[str, Any] = {
            "attacker": attacker,
            "round": server_round,
            "variant": variant,
            "target": target,
        }
        try:
            record.update(
                score_generated(
                    images,
                    target=target,
                    evaluator=evaluator,
                    reference=reference,
                    realism_threshold=self.threshold,
                )
            )
        except ValueError as err:  # e.g. a generator that diverged to NaN
            record.update(success=False, error=str(err))
            self.run.append_jsonl("attack.jsonl", record)
            return record
        tag = f"{variant}-a{attacker}-round-{server_round:04d}"
        save_image_grid(images, self.run.path / "samples" / f"{tag}.png")
        victims = reference.of_classes([target]).images
        shown = images[:10]
        nearest = victims[nearest_images(shown, victims).view(-1)]
        save_comparison_grid(nearest, shown, self.run.path / "grids" / f"figure6-{tag}.png")
        self.run.append_jsonl("attack.jsonl", record)
        return record

    def model_inversion(self, model_path: Path) -> dict | None:
        """Fredrikson et al.'s baseline on the final shared model, scored the same way."""
        from fedleak.attacker.model_inversion import invert

        if not model_path.exists():
            return None
        ev = self.cfg["eval"]
        model = build_classifier(self.cfg["model"]["name"], self.cfg["model"]["num-classes"])
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
        images = invert(
            model,
            ev["target-class"],
            image_shape(self.cfg["data"]["dataset"]),
            steps=ev["mi-steps"],
            lr=ev["mi-lr"],
            seed=self.cfg["run"]["seed"],
        )
        rounds = [r.get("round", 0) for r in self.run.read_jsonl("metrics.jsonl")]
        return self._score(
            images, -1, max(rounds, default=0), "model-inversion", ev["target-class"]
        )
