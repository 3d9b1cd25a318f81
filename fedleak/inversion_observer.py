"""The experimenter's side of a gradient-inversion run: score the reconstructions the attackers
kept (the adversarial client's out-dir, the curious server's folder) against the private batches.

A participant's batch in a round is a pure function of the config (``clients.app.round_batch``),
so ground truth is recomputed here and never written by, or sent to, any role.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fedleak.clients.app import round_batch
from fedleak.clients.participant import Participant
from fedleak.config import participant_spec, to_run_config
from fedleak.data.partition import parse_classes
from fedleak.metrics.images import score_batch
from fedleak.report.grids import save_comparison_grid
from fedleak.runfolder import INVERSION, SERVER_ATTACK_DIR, RunFolder

log = logging.getLogger(__name__)

LOG = INVERSION


class InversionObserver:
    def __init__(self, run: RunFolder, cfg: dict[str, Any]) -> None:
        self.run = run
        self.cfg = cfg
        self.flat = to_run_config(cfg, include_participants=True)
        self.scored = {r["file"] for r in run.read_jsonl(LOG) if "file" in r}

    def _sources(self) -> list[tuple[str, int | None, Path]]:
        found = []
        for i, p in enumerate(self.cfg["participants"]):
            if p.get("mode") == "inversion" and p.get("out-dir"):
                found += [
                    ("client", i, f) for f in sorted(Path(p["out-dir"]).glob("inversions/*.pt"))
                ]
        found += [
            ("server", None, f) for f in sorted((self.run.path / SERVER_ATTACK_DIR).glob("*.pt"))
        ]
        return found

    def poll(self) -> list[dict]:
        new = []
        for threat, attacker, path in self._sources():
            if str(path) in self.scored:
                continue
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # being replaced, or damaged: try next poll
                log.warning("cannot read %s: %s", path, err)
                continue
            record = self._score(saved, threat, attacker, path)
            self.run.append_jsonl(LOG, record)
            self.scored.add(str(path))
            new.append(record)
        return new

    def _batch(self, index: int, server_round: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec = participant_spec(self.cfg, index)
        me = Participant(spec["role"], index, tuple(parse_classes(spec.get("classes", ""))), spec)
        config = {
            "protocol": self.cfg["run"]["protocol"],
            "batch-size": self.cfg["train"]["batch-size"],
            "examples-per-round": self.cfg["train"]["examples-per-round"],
            "server-round": server_round,
        }
        return round_batch(me, self.flat, config)

    def _score(self, saved: dict, threat: str, attacker: int | None, path: Path) -> dict:
        server_round = int(saved["round"])
        record: dict[str, Any] = {
            "kind": "inversion",
            "threat": threat,
            "round": server_round,
            "file": str(path),
        }
        for key in ("attack", "kind", "batch_size", "local_steps", "isolated", "node", "seconds"):
            if key in saved:
                record["update" if key == "kind" else key] = saved[key]
        if "error" in saved:
            record["error"] = str(saved["error"])
            return record
        images, labels = saved["images"], saved["labels"]
        others = [i for i in range(len(self.cfg["participants"])) if i != attacker]
        if threat == "client":
            # The isolated update is every other client's: score against all their batches.
            batches = [self._batch(i, server_round) for i in others]
            truth = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            score, matched = self._try(images, labels, truth), None
        else:
            # The server knows nodes, not participants: the best-matching participant's batch.
            candidates = [(i, self._batch(i, server_round)) for i in others]
            scored = [(self._try(images, labels, b), i) for i, b in candidates]
            scored = [(s, i) for s, i in scored if s is not None]
            score, matched = max(scored, key=lambda t: t[0]["psnr"]) if scored else (None, None)
            truth = dict(candidates)[matched] if matched is not None else None
        if score is None:
            record["error"] = "the reconstruction does not fit any participant's batch"
            return record
        record.update(
            participant=matched,
            psnr=score["psnr"],
            ssim=score["ssim"],
            mse=score["mse"],
            psnr_per_image=score["psnr_per_image"],
            label_accuracy=score["label_accuracy"],
            loss_final=saved["loss_history"][-1] if saved.get("loss_history") else None,
            iterations=len(saved.get("loss_history", [])),
        )
        tag = f"inversion-{threat}-round-{server_round:04d}" + (
            f"-node-{saved['node']}" if "node" in saved else ""
        )
        paired = images[torch.as_tensor(score["order"])]
        save_comparison_grid(
            truth[0],
            paired.clamp(-1, 1),
            self.run.path / "grids" / f"{tag}.png",
            labels=("private", "reconstructed"),
            scale=3,
        )
        self.run.write_json(f"curves/{tag}.json", {"loss": saved.get("loss_history", [])})
        return record

    @staticmethod
    def _try(images: torch.Tensor, labels: torch.Tensor, truth: tuple) -> dict | None:
        if tuple(images.shape) != tuple(truth[0].shape):
            return None
        return score_batch(images, truth[0], labels, truth[1])
