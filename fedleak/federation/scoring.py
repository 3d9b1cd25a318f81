"""The experimenter's side of a federated run: read what the roles sent (the run folder's inbox)
and measure it against ground truth.

- Each round's global model is evaluated on the test set (accuracy, and per GAN attacker the
  victim-side cost: target test images pushed into the fake class) -> ``metrics.jsonl``.
- An attacker's generated samples are scored against the victim's real images -> ``attack.jsonl``.
- A reconstruction is scored against the private batch the victim trained on, recomputed from
  the seed (the victim never wrote it anywhere) -> ``inversion.jsonl``.

This is the only place that touches ground truth (breaching's rule). It also keeps the run's
health: who took part in which round, what the server rejected, and whether the model stayed
finite; :meth:`Scoring.verdict` turns that into the run's status.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedleak import inbox
from fedleak.data import ImageSet, image_shape, load_dataset
from fedleak.metrics.attack import nearest_images, score_generated
from fedleak.metrics.classification import class_rates
from fedleak.metrics.images import score_batch
from fedleak.models import build_classifier
from fedleak.protocol import Instructions
from fedleak.records import (
    GanScore,
    InversionScore,
    NodeReport,
    ReconstructionReport,
    Record,
    RoundMetrics,
    RoundReport,
    SampleSet,
    StatusReport,
)
from fedleak.report.grids import save_comparison_grid, save_image_grid
from fedleak.runfolder import ATTACK, INVERSION, METRICS, RunFolder, Status, atomic_torch_save
from fedleak.settings import FederationSettings
from fedleak.training import round_batch

log = logging.getLogger(__name__)

FINAL_MODEL = "final-model.pt"
SCORED = "scored.txt"  # inbox files already turned into scores, one name a line
# When the federation runs far ahead of the experimenter (tiny rounds on the Simulation Engine),
# a round report with at least this many newer ones waiting is recorded but not evaluated, so the
# scores stay near the present; the metrics line says so.
BACKLOG = 4
STRIP = 12  # samples per round in the report's progression strips
MODEL_INVERSION_IMAGES = 16  # reconstructions of the baseline, from independent starts


@dataclass
class Health:
    """What the run looked like from the experimenter's seat."""

    server: str = ""  # the server's last status: running / finished / failed
    server_message: str = ""
    last_round: int = -1
    nodes: dict[int, NodeReport] = field(default_factory=dict)  # node id -> who it is
    replied: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    aggregated: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    rejected: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    non_finite_rounds: list[int] = field(default_factory=list)
    empty_rounds: list[int] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def who(self, node: int) -> str:
        known = self.nodes.get(node)
        return f"participant {known.participant} ({known.role})" if known else f"node {node}"


class Scoring:
    def __init__(self, run: RunFolder, settings: FederationSettings) -> None:
        self.run = run
        self.settings = settings
        self.folder = run.path / inbox.INBOX
        self.health = Health()
        self._done = (
            set(run.file(SCORED).read_text().split()) if run.file(SCORED).exists() else set()
        )
        self._evaluator: torch.nn.Module | None = None
        self._reference: ImageSet | None = None  # the training split: what the victims hold
        self._test: ImageSet | None = None  # held out: the evaluation and realism calibration
        self._model = build_classifier(settings.model.name, settings.model.num_classes)
        self._final: dict[str, np.ndarray] | None = None
        self._seen_files = 0

    # --- ground truth, loaded once -------------------------------------------------------

    def prepare(self, say: Callable[[str], None] = lambda text: None) -> None:
        """Load the test set, load (or train once and cache) the evaluator and calibrate the
        realism thresholds, before the federation competes for the CPU with them."""
        from fedleak.metrics.attack import calibrate_realism
        from fedleak.models.evaluator import is_cached

        self.test_set()
        targets = self.settings.gan_targets()
        if not targets:
            return
        if not is_cached(self.settings.data.dataset):
            say(
                "training the evaluator once (an independent classifier that scores the "
                "attack; about a minute on 2 cores, cached for later runs)"
            )
        evaluator, reference = self.evaluator()
        sizes = {self.settings.attack.num_samples}
        if self.settings.eval.model_inversion:
            sizes.add(MODEL_INVERSION_IMAGES)
        for target in {t.target for t in targets}:
            for size in sizes:
                calibrate_realism(
                    size,
                    target=target,
                    evaluator=evaluator,
                    reference=reference,
                    held_out=self.test_set(),
                )

    def test_set(self) -> ImageSet:
        if self._test is None:
            data = self.settings.data
            self._test = load_dataset(data.dataset, "test", data.root or None)
        return self._test

    def evaluator(self) -> tuple[torch.nn.Module, ImageSet]:
        if self._evaluator is None:
            from fedleak.models.evaluator import get_evaluator

            data = self.settings.data
            self._evaluator, info = get_evaluator(data.dataset, data.root or None)
            self.run.write_meta(evaluator=info)
            self._reference = load_dataset(data.dataset, "train", data.root or None)
        return self._evaluator, self._reference

    # --- the inbox -----------------------------------------------------------------------

    def poll(self, budget: float | None = None) -> list[Record]:
        """Turn inbox records not handled yet into scores, oldest first, for at most ``budget``
        seconds (all of them without one); returns what it wrote (and the server's status
        reports) for the console."""
        started = time.monotonic()
        out: list[Record] = []
        pending = [p for p in inbox.entries(self.folder) if p.name not in self._done]
        rounds = [p for p in pending if "-server-round-" in p.name]
        for path in pending:
            if budget is not None and time.monotonic() - started > budget:
                break
            try:
                envelope = inbox.read(path)
                record = envelope.record()
            except (ValueError, TypeError) as err:
                self.health.unreadable.append(f"{path.name}: {err}")
                log.warning("skipping %s", err)
                self._mark(path)
                continue
            newer = len(rounds) - 1 - rounds.index(path) if path in rounds else 0
            out += self._handle(record, path.name, evaluate=newer < BACKLOG)
            self._mark(path)
        return out

    def folder_changed(self) -> bool:
        """Whether records arrived since the last call (even ones not scored yet)."""
        count = sum(1 for _ in self.folder.glob("*.npz")) if self.folder.exists() else 0
        changed, self._seen_files = count != self._seen_files, count
        return changed

    def _mark(self, path: Path) -> None:
        self._done.add(path.name)
        with open(self.run.file(SCORED), "a", encoding="utf-8") as fh:
            fh.write(path.name + "\n")

    def _handle(self, record: Record, source: str, evaluate: bool = True) -> list[Record]:
        if isinstance(record, NodeReport):
            self.health.nodes[record.node] = record
            return [record]
        if isinstance(record, StatusReport):
            self.health.server, self.health.server_message = record.state, record.message
            return [record]
        if isinstance(record, RoundReport):
            return [self._round(record, evaluate)]
        if isinstance(record, SampleSet):
            return [self._samples(record, source)]
        if isinstance(record, ReconstructionReport):
            return [self._reconstruction(record, source)]
        return []

    # --- rounds --------------------------------------------------------------------------

    def _round(self, report: RoundReport, evaluate: bool = True) -> RoundMetrics:
        h = self.health
        h.last_round = max(h.last_round, report.round)
        for node in report.replied:
            h.replied[node].append(report.round)
        for node in report.aggregated:
            h.aggregated[node].append(report.round)
        for item in report.rejected:
            h.rejected[int(item["node"])].append(f"round {report.round}: {item['reason']}")
        if not report.model_finite:
            h.non_finite_rounds.append(report.round)
        if report.round > 0 and not report.aggregated:
            h.empty_rounds.append(report.round)
        metrics = RoundMetrics(
            round=report.round,
            time=report.elapsed,
            sent=report.sent,
            participants=len(report.aggregated),
            rejected=len(report.rejected),
            rejections=[
                {"node": r["node"], "who": h.who(int(r["node"])), "reason": r["reason"]}
                for r in report.rejected
            ],
            clipped=len(report.clipped),
            train_loss=report.train.get("train_loss"),
            model_finite=report.model_finite,
            extra={k: v for k, v in report.train.items() if k != "train_loss"},
        )
        state = {k: torch.from_numpy(np.array(v)) for k, v in report.arrays.items()}
        finite = all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        if state and finite:
            if evaluate:
                self._model.load_state_dict(state)
                self._evaluate(metrics)
            else:
                metrics.extra["not_evaluated"] = 1.0  # the experimenter was rounds behind
            self._final = report.arrays
            atomic_torch_save(state, self.run.path / FINAL_MODEL)
        elif state:
            metrics.model_finite = False
            h.non_finite_rounds.append(report.round)
        self.run.append_jsonl(METRICS, metrics.to_dict())
        return metrics

    def _evaluate(self, metrics: RoundMetrics) -> None:
        test = self.test_set()
        self._model.eval()
        overall = class_rates(self._model, test.images, test.labels, fake_class=None)
        metrics.test_accuracy = overall["accuracy"]
        for t in self.settings.gan_targets():
            victims = test.of_classes([t.target])
            rates = class_rates(self._model, victims.images, victims.labels, fake_class=t.fake)
            metrics.victims.append(
                {
                    "attacker": t.attacker,
                    "target": t.target,
                    "fake": t.fake,
                    "to_fake": rates["to_fake"],
                    "target_accuracy": rates["accuracy"],
                }
            )

    # --- GAN samples ---------------------------------------------------------------------

    @property
    def realism_threshold(self) -> float | None:
        value = self.settings.eval.realism_threshold
        return value if value > 0 else None

    def _samples(self, samples: SampleSet, source: str) -> GanScore:
        images = torch.from_numpy(np.array(samples.images, dtype=np.float32))
        return self.score_gan(images, samples.attacker, samples.round, samples.mode, samples.target)

    def score_gan(
        self,
        images: torch.Tensor,
        attacker: int | None,
        server_round: int,
        variant: str,
        target: int,
    ) -> GanScore:
        evaluator, reference = self.evaluator()
        score = GanScore(attacker=attacker, round=server_round, variant=variant, target=target)
        try:
            measures = score_generated(
                images,
                target=target,
                evaluator=evaluator,
                reference=reference,
                held_out=self.test_set(),
                realism_threshold=self.realism_threshold,
            )
        except ValueError as err:  # e.g. a generator that diverged to NaN
            score.error = str(err)
        else:
            score.success = bool(measures.pop("success"))
            score.measures = measures
            tag = f"{variant}-a{attacker}-round-{server_round:04d}"
            save_image_grid(images, self.run.path / "samples" / f"{tag}.png")
            # one row per scored round: the report stacks them to show the attack's progress
            save_image_grid(images[:STRIP], self.run.path / "samples" / f"strip-{tag}.png", STRIP)
            victims = reference.of_classes([target]).images
            shown = images[:10]
            nearest = victims[nearest_images(shown, victims).view(-1)]
            save_comparison_grid(nearest, shown, self.run.path / "grids" / f"figure6-{tag}.png")
        self.run.append_jsonl(ATTACK, score.to_dict())
        return score

    def model_inversion(self) -> list[GanScore]:
        """Fredrikson et al.'s baseline on the final shared model, per GAN target."""
        from fedleak.attacker.model_inversion import invert

        ev = self.settings.eval
        if self._final is None or not ev.model_inversion:
            return []
        state = {k: torch.from_numpy(np.array(v)) for k, v in self._final.items()}
        self._model.load_state_dict(state)
        out = []
        for t in self.settings.gan_targets():
            images = invert(
                self._model,
                t.target,
                image_shape(self.settings.data.dataset),
                num=MODEL_INVERSION_IMAGES,
                steps=ev.mi_steps,
                lr=ev.mi_lr,
                seed=self.settings.run.seed,
            )
            out.append(
                self.score_gan(
                    images, t.attacker, self.health.last_round, "model-inversion", t.target
                )
            )
        return out

    # --- reconstructions -----------------------------------------------------------------

    def _batch(self, participant: int, server_round: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.settings.specs()[participant]
        train = self.settings.train
        todo = Instructions(
            server_round=server_round,
            protocol=self.settings.run.protocol,
            lr=train.lr,
            batch_size=train.batch_size,
            local_batches=train.local_batches,
            examples_per_round=train.examples_per_round,
        )
        return round_batch(spec, self.settings, todo)

    def _reconstruction(self, rec: ReconstructionReport, source: str) -> InversionScore:
        # what the attacker said about its work carries over; the scores are computed here
        said = {k: v for k, v in rec.to_dict().items() if k in InversionScore.__dataclass_fields__}
        score = InversionScore(
            **said,
            source=source,
            loss_final=rec.loss_history[-1] if rec.loss_history else None,
        )
        if rec.error is None:
            self._score_reconstruction(rec, score)
        self.run.append_jsonl(INVERSION, score.to_dict())
        return score

    def _score_reconstruction(self, rec: ReconstructionReport, score: InversionScore) -> None:
        images = torch.from_numpy(np.array(rec.images, dtype=np.float32))
        labels = torch.from_numpy(np.array(rec.labels))
        others = [s.index for s in self.settings.specs() if s.index != rec.attacker]
        if rec.threat == "client":
            # The isolated update is every other client's: score against all their batches.
            batches = [self._batch(i, rec.round) for i in others]
            truth = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
            result = _try(images, labels, truth)
            matched = others[0] if len(others) == 1 else None  # the one victim, when there is one
        else:
            # The server knows nodes, not participants: the best-matching participant's batch
            # (or the one that announced this node id).
            known = self.health.nodes.get(rec.node) if rec.node is not None else None
            pool = [known.participant] if known else others
            candidates = {i: self._batch(i, rec.round) for i in pool}
            tried = [(r, i) for i, b in candidates.items() if (r := _try(images, labels, b))]
            result, matched = max(tried, key=lambda t: t[0]["psnr"]) if tried else (None, None)
            truth = candidates.get(matched)
        if result is None:
            score.error = "the reconstruction does not fit any participant's batch"
            return
        score.participant = matched
        score.psnr, score.ssim, score.mse = result["psnr"], result["ssim"], result["mse"]
        score.psnr_per_image = result["psnr_per_image"]
        score.label_accuracy = result["label_accuracy"]
        tag = f"inversion-{rec.threat}-round-{rec.round:04d}" + (
            f"-node-{rec.node}" if rec.node is not None else ""
        )
        paired = images[torch.as_tensor(result["order"])]
        save_comparison_grid(
            truth[0],
            paired.clamp(-1, 1),
            self.run.path / "grids" / f"{tag}.png",
            labels=("private", "reconstructed"),
            scale=3,
        )
        self.run.write_json(f"curves/{tag}.json", {"loss": rec.loss_history})

    # --- the run's health ----------------------------------------------------------------

    def verdict(self, launcher: Status, message: str) -> tuple[Status, str, list[str]]:
        """The run's status from what the launcher saw and what the records say, with the
        notes a reader needs (rejections, lost participants, unreadable records)."""
        h, notes = self.health, []
        status, reasons = launcher, [message] if message else []
        if h.server == "failed":
            status = Status.FAILED
            reasons.append(f"the ServerApp failed: {h.server_message}")
        if self._final is None and h.last_round > 0:
            status = Status.FAILED
            reasons.append("no finite global model was ever produced")
        elif h.non_finite_rounds:
            rounds = ", ".join(map(str, sorted(set(h.non_finite_rounds))))
            notes.append(f"the aggregate was not finite in round(s) {rounds}; it was not adopted")
        if h.empty_rounds:
            notes.append(
                f"{len(h.empty_rounds)} round(s) aggregated no reply: "
                + ", ".join(map(str, h.empty_rounds[:20]))
            )
        for node, why in sorted(h.rejected.items()):
            notes.append(f"{h.who(node)}: {len(why)} reply(ies) rejected, first: {why[0]}")
        lost = self.lost_participants()
        if lost and status == Status.FINISHED:
            status = Status.DEGRADED
        reasons += lost
        notes += [f"unreadable record {u}" for u in h.unreadable]
        return status, "; ".join(r for r in reasons if r), notes

    def lost_participants(self) -> list[str]:
        """Participants that took part and then never again, or never at all."""
        h = self.health
        if h.last_round < 1:
            return []
        gap = self.settings.num_participants if self.settings.run.protocol == "collaborative" else 1
        out = []
        seen_nodes = set(h.replied) | set(h.nodes)
        for node in sorted(seen_nodes):
            rounds = h.replied.get(node, [])
            if rounds and max(rounds) < h.last_round - gap + 1:
                out.append(f"{h.who(node)} stopped replying after round {max(rounds)}")
        # A node that announced itself but never replied, in a run where work went out and no
        # reply came back (a participant killed before its first turn under sampling).
        if h.empty_rounds:
            for node in sorted(n for n in h.nodes if not h.replied.get(n)):
                rounds = ", ".join(map(str, h.empty_rounds[:10]))
                out.append(f"{h.who(node)} never replied (round(s) {rounds} got no reply)")
        announced = {n.participant for n in h.nodes.values()}
        if h.nodes and h.last_round >= gap and len(announced) < self.settings.num_participants:
            roles = {spec.index: spec.role for spec in self.settings.specs()}
            for index in sorted(set(range(self.settings.num_participants)) - announced):
                out.append(f"participant {index} ({roles.get(index, '?')}) never took part")
        return out

    def participation(self) -> list[dict]:
        """Per participant (or node): rounds replied, aggregated and rejected, for the report."""
        h = self.health
        rows = []
        for node in sorted(set(h.replied) | set(h.nodes)):
            known = h.nodes.get(node)
            rows.append(
                {
                    "who": h.who(node),
                    "participant": known.participant if known else None,
                    "node": node,
                    "device": known.device if known else None,
                    "replied": len(h.replied.get(node, [])),
                    "aggregated": len(h.aggregated.get(node, [])),
                    "rejected": len(h.rejected.get(node, [])),
                    "last_round": max(h.replied[node]) if h.replied.get(node) else None,
                }
            )
        return sorted(rows, key=lambda r: (r["participant"] is None, r["participant"] or 0))


def _try(images: torch.Tensor, labels: torch.Tensor, truth: tuple) -> dict | None:
    if tuple(images.shape) != tuple(truth[0].shape):
        return None
    return score_batch(images, truth[0], labels, truth[1])
