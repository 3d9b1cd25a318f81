"""Wall time of the README's main job (`fedleak run`, the demo preset), stage by stage.

Runs the command as a user would (a fresh process each time, `--json` so that every event
carries the seconds since the command started) and prints when each stage was reached: the
SuperLink up, the SuperNodes started, the run submitted, the first node heard from, the first
round, the first attack result, the end; and whether the verdict was a leak. The machine's load
average is printed with each repetition: "quiet" means about 0 before the run.

    python benchmarks/main_job.py                  # demo, 2 repetitions
    python benchmarks/main_job.py --preset smoke --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {
    "superlink": lambda e: e["event"] == "info" and e["message"].startswith("SuperLink listening"),
    "supernodes": lambda e: e["event"] == "info" and "SuperNodes started" in e["message"],
    "submitted": lambda e: e["event"] == "info" and " submitted (" in e["message"],
    "first node": lambda e: e["event"] == "node",
    "round 1": lambda e: e["event"] == "round" and e.get("round") == 1,
    "first attack result": lambda e: e["event"] in ("inversion-score", "attack-score"),
    "done": lambda e: e["event"] == "done",
}


def once(preset: str, out: Path) -> tuple[dict[str, float], float, list[str], str]:
    cmd = [sys.executable, "-m", "fedleak.cli", "run", preset, "--json"]
    cmd += ["--set", f'run.out-dir="{out}"']
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    reached: dict[str, float] = {}
    verdicts: list[str] = []
    status = f"exit {proc.returncode}"
    for line in proc.stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        for stage, matches in STAGES.items():
            if stage not in reached and matches(event):
                reached[stage] = event["elapsed"]
        if event["event"] == "verdict":
            verdicts.append(event["message"])
        if event["event"] == "done":
            status = event["status"]
    if proc.returncode not in (0, 3):
        print(proc.stderr[-2000:], file=sys.stderr)
    return reached, wall, verdicts, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", default="demo")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    walls: list[float] = []
    firsts: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fedleak-main-job-") as tmp:
        for rep in range(args.repeat):
            load = os.getloadavg()[0]
            reached, wall, verdicts, status = once(args.preset, Path(tmp) / str(rep))
            walls.append(wall)
            if "round 1" in reached:
                firsts.append(reached["round 1"])
            print(f"repeat {rep + 1}: {status}, wall {wall:.0f} s (load average {load:.1f})")
            for stage in STAGES:
                at = reached.get(stage)
                print(f"  {stage:20s} {'—' if at is None else f'{at:6.1f} s'}")
            for line in verdicts:
                print(f"  verdict: {line}")
    print(f"\n{args.preset}: median wall {statistics.median(walls):.0f} s", end="")
    if firsts:
        print(f", round 1 reported after {statistics.median(firsts):.0f} s (median)")
    else:
        print()


if __name__ == "__main__":
    main()
