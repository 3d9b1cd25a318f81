"""What a federated run tells the person (or the script) that started it.

Three modes: ``text`` (lines a person reads; on a terminal a live bar of the rounds with the
elapsed time and an estimate of what is left), ``quiet`` (warnings, the verdict and the report's
path only) and ``json`` (one JSON object a line, ``{"event": ..., "elapsed": seconds, ...}``,
for scripts and CI).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Literal, TextIO

from fedleak.records import GanScore, InversionScore, NodeReport, Record, RoundMetrics, StatusReport
from fedleak.report.page import fmt

Mode = Literal["text", "quiet", "json"]


class Console:
    def __init__(self, mode: Mode = "text", out: TextIO | None = None, rounds: int = 0) -> None:
        self.mode = mode
        self.out = out or sys.stdout
        self.rounds = rounds
        self.started = time.monotonic()
        self._bar = None  # a rich progress bar, once the rounds start, on a terminal only
        self._task = None

    def _emit(self, event: str, text: str, important: bool = False, **data: Any) -> None:
        if self.mode == "json":
            # elapsed: seconds since the command started, for scripts that time the stages
            line = {"event": event, "elapsed": round(time.monotonic() - self.started, 2), **data}
            print(json.dumps(line, default=str), file=self.out, flush=True)
        elif self.mode == "text" or important:
            if self._bar is not None:
                self._bar.console.print(text, highlight=False, markup=False)
            else:
                print(text, file=self.out, flush=True)

    def start_rounds(self) -> None:
        """From here on a live bar shows the rounds (text mode, on a terminal)."""
        if self.mode != "text" or not self.out.isatty() or self._bar is not None:
            return
        from rich.console import Console as RichConsole
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("left ~"),
            TimeRemainingColumn(),
            console=RichConsole(file=self.out),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task("rounds", total=self.rounds)

    def stop_rounds(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def info(self, text: str) -> None:
        self._emit("info", f"fedleak: {text}", message=text)

    def warn(self, text: str) -> None:
        self._emit("warning", f"fedleak: warning: {text}", important=True, message=text)

    def record(self, record: Record) -> None:
        """A record the scoring produced or passed on."""
        if isinstance(record, RoundMetrics):
            self._round(record)
        elif isinstance(record, GanScore):
            self._gan(record)
        elif isinstance(record, InversionScore):
            self._inversion(record)
        elif isinstance(record, NodeReport):
            self._emit(
                "node",
                f"  participant {record.participant} ({record.role}) is node {record.node}",
                **record.to_dict(),
            )
        elif isinstance(record, StatusReport) and record.state == "failed":
            self.warn(f"the ServerApp failed: {record.message}")

    def _round(self, m: RoundMetrics) -> None:
        if m.round == 0:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=m.round)
        acc = "—" if m.test_accuracy is None else f"{m.test_accuracy:.3f}"
        line = f"round {m.round:>3}/{self.rounds}  test acc {acc}"
        if m.to_fake is not None:
            line += f"  target->fake {m.to_fake:.2f}"
        line += f"  t={m.time:.0f}s"
        if m.participants == 0:
            line += "  (no usable reply this round)"
        if m.rejected:
            line += f"  ({m.rejected} reply(ies) rejected)"
        self._emit("round", line, **m.to_dict())

    def _gan(self, s: GanScore) -> None:
        if s.error:
            text = f"  attack {s.variant} round {s.round}: {s.error}"
        else:
            m = {
                k: fmt(v, 2 if k in ("target_rate", "diversity") else 1)
                for k, v in s.measures.items()
            }
            text = (
                f"  {s.variant} attack, round {s.round}: evaluator rate {m.get('target_rate')}, "
                f"FD {m.get('fd')} (threshold {m.get('fd_threshold')}), diversity "
                f"{m.get('diversity')} -> {s.measures.get('verdict', 'no verdict')}"
            )
        self._emit("attack-score", text, **s.to_dict())

    def _inversion(self, s: InversionScore) -> None:
        who = "the adversarial client" if s.threat == "client" else "the curious server"
        if s.participant is not None:  # the scoring matched the images to their owner
            whose = f"participant {s.participant}'s update"
        elif s.node is not None:
            whose = f"node {s.node}'s update"
        else:
            whose = "the other participants' update"
        head = f"  inversion of {whose} by {who}, round {s.round}"
        if s.error:
            text = f"{head}: {s.error}"
        else:
            text = (
                f"{head}: PSNR {s.psnr:.1f} dB, SSIM {s.ssim:.3f}, "
                f"labels {s.label_accuracy:.0%}, {s.seconds:.0f} s ({s.attack}, {s.update})"
            )
        self._emit("inversion-score", text, **s.to_dict())

    def verdict(self, lines: list[str]) -> None:
        for line in lines:
            self._emit("verdict", f"fedleak: {line}", important=True, message=line)

    def done(self, status: str, message: str, report: str) -> None:
        self.stop_rounds()
        text = f"fedleak: {status}{': ' + message if message else ''}\nfedleak: report {report}"
        self._emit("done", text, important=True, status=status, message=message, report=report)
