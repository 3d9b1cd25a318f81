"""Many virtual participants on one machine: Flower's Simulation Engine with N honest clients
(a participant group, IID MNIST partitions) for one FedAvg round. Prints the seconds the run
took, the seconds of its one round, and the peak memory of the whole process tree (the launcher,
the SuperLink, the simulation and Ray's workers), sampled every half second.

    python benchmarks/simulation_scale.py                 # 100 clients, 1 round
    python benchmarks/simulation_scale.py --clients 20 --rounds 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from fedleak.federation.console import Console
from fedleak.federation.launcher import launch
from fedleak.settings import load_federation


def tree_rss(root: int) -> int:
    """Resident memory (bytes) of ``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            pages = int(Path(f"/proc/{entry.name}/statm").read_text().split()[1])
        except OSError:
            continue
        pid, ppid = int(entry.name), int(stat[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = pages * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        preset = Path(tmp) / "scale.toml"
        preset.write_text(
            'description = "simulation scale benchmark"\n'
            '[run]\nengine = "simulation"\nprotocol = "fedavg"\n'
            f"rounds = {args.rounds}\nround-timeout = 1800.0\nstartup-timeout = 600.0\n"
            '[data]\npartition = "iid"\n[model]\nnum-classes = 10\n'
            "[train]\nlocal-batches = 2\nbatch-size = 32\n"
            f'[[participants]]\nrole = "honest"\ncount = {args.clients}\n'
        )
        settings = load_federation(str(preset), [f'run.out-dir="{tmp}/runs"'])
        peak = {"bytes": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak["bytes"] = max(peak["bytes"], tree_rss(os.getpid()))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        report, status = launch(settings, Console("quiet", out=io.StringIO()))
        wall = time.monotonic() - started
        done.set()
        sampler.join()
        metrics = [
            json.loads(x) for x in (report.parent / "metrics.jsonl").read_text().split("\n") if x
        ]
        rounds = [m for m in metrics if m["round"] > 0]
        per_round = (
            (rounds[-1]["time"] - metrics[0]["time"]) / len(rounds) if rounds else float("nan")
        )
        print(
            f"{args.clients} virtual clients, {len(rounds)} round(s), status {status}: "
            f"{wall:.1f} s in all, {per_round:.1f} s per round (ServerApp clock), "
            f"peak memory {peak['bytes'] / 2**30:.2f} GiB, "
            f"clients aggregated in the last round: {rounds[-1]['participants'] if rounds else 0}"
        )


if __name__ == "__main__":
    main()
