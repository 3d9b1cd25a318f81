"""What a federated round costs on the Deployment Engine: Flower's floor against fedleak's app,
in one run, on the same SuperLink and the same SuperNodes.

The floor is benchmarks/floor_app (numpy only: 1,000 floats out, back plus one, averaged). The
fedleak side is FedAvg with two honest participants and next to no compute (one SGD step on 8
MNIST images), so the difference is what fedleak adds per round: its imports in each fresh
ClientApp process, loading the participant's data, building the model, the server's checks and
its report to the experimenter. The two apps alternate (floor, fedleak, floor, fedleak, ...)
so that a change in the machine's load hits both alike. A third app, the floor with one SGD step
of a small PyTorch CNN (torch imported in every fresh ClientApp process, as any PyTorch app on
Flower must), separates what PyTorch costs from what fedleak adds. Prints seconds per round
(medians over the rounds after the first) and the ratios.

    python benchmarks/round_cost.py                 # 2 repetitions of 6 rounds each
    python benchmarks/round_cost.py --rounds 8 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from fedleak import inbox
from fedleak.federation.collector import Collector
from fedleak.federation.launcher import (
    CONNECTION,
    flower_env,
    flwr,
    report_tokens,
    run_status,
    start_superlink,
    start_supernode,
    submit,
    write_connection,
)
from fedleak.federation.processes import ProcessGroup, pick_ports
from fedleak.records import RoundReport
from fedleak.reporting import TOKEN_ENV
from fedleak.runfolder import RunFolder
from fedleak.settings import load_federation
from fedleak.settings.flower import node_config_arg, to_node_config

FLOOR = Path(__file__).resolve().parent / "floor_app"
PRESET = """description = "round cost: two honest participants, next to no compute"
[run]
engine = "deployment"
protocol = "fedavg"
rounds = {rounds}
[data]
partition = "iid"
[model]
num-classes = 10
[train]
local-batches = 1
batch-size = 8
lr-decay = 0.0
[eval]
model-inversion = false
[[participants]]
role = "honest"
count = 2
"""


def wait_finished(env: dict[str, str], run_id: int, limit: float = 1800) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = run_status(env, run_id)
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise RuntimeError(f"run {run_id} did not finish within {limit:.0f} s")


def floor_rounds(env: dict[str, str], rounds: int, torch: bool = False) -> list[float]:
    result = flwr(
        env,
        "run",
        str(FLOOR),
        CONNECTION,
        "--run-config",
        f"rounds={rounds} nodes=2 torch={int(torch)}",
        "--format",
        "json",
    )
    run_id = int(json.loads(result.stdout)["run-id"])
    status = wait_finished(env, run_id)
    log = flwr(env, "log", str(run_id), CONNECTION, "--show", timeout=120).stdout
    seconds = [float(s) for s in re.findall(r"floor round \d+: ([0-9.]+) s", log)]
    if len(seconds) != rounds:
        raise RuntimeError(f"floor run {run_id} ({status}) logged {len(seconds)} of {rounds}")
    return seconds


def fedleak_rounds(run: RunFolder, settings, env: dict[str, str]) -> list[float]:
    before = {p.name for p in inbox.entries(run.path / "inbox")}
    run_id = submit(run, settings, env)
    wait_finished(env, run_id)
    time.sleep(2)  # the last report is sent right after the round
    reports = [
        inbox.read(p).record()
        for p in inbox.entries(run.path / "inbox")
        if p.name not in before and "-server-round-" in p.name
    ]
    elapsed = sorted(r.elapsed for r in reports if isinstance(r, RoundReport))
    return [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        preset = Path(tmp) / "cost.toml"
        preset.write_text(PRESET.format(rounds=args.rounds))
        run = RunFolder(Path(tmp) / "run")
        settings = load_federation(str(preset), [f'deployment.node-root="{tmp}/nodes"'])
        grants, tokens = report_tokens(settings)
        collector = Collector(run.path / "inbox", grants).start()
        settings = settings.model_copy(
            update={
                "deployment": settings.deployment.model_copy(
                    update={"collector": f"127.0.0.1:{collector.port}"}
                )
            }
        )
        procs = ProcessGroup(flower_env(run))
        try:
            port, *node_ports = pick_ports(0, 3, "benchmark")
            logs = run.path / "logs"
            start_superlink(procs, port, logs, False, env={TOKEN_ENV: tokens["server"]})
            for spec, node_port in zip(settings.specs(), node_ports, strict=True):
                start_supernode(
                    procs,
                    port,
                    node_port,
                    node_config_arg(to_node_config(spec, settings.attack)),
                    f"node {spec.index}",
                    logs / f"node-{spec.index}.log",
                    env={TOKEN_ENV: tokens[f"participant-{spec.index}"]},
                )
            write_connection(run, f"127.0.0.1:{port}")
            floor, torch_floor, ours = [], [], []
            for i in range(args.repeat):
                f = floor_rounds(procs.env, args.rounds)[1:]  # the first round waits for nodes
                t = floor_rounds(procs.env, args.rounds, torch=True)[1:]
                o = fedleak_rounds(run, settings, procs.env)[1:]
                floor += f
                torch_floor += t
                ours += o
                print(
                    f"repetition {i + 1}: floor {statistics.median(f):.2f} s/round, floor with "
                    f"one torch step {statistics.median(t):.2f}, fedleak "
                    f"{statistics.median(o):.2f} s/round",
                    flush=True,
                )
        finally:
            procs.stop()
            collector.stop()
    a, t, b = statistics.median(floor), statistics.median(torch_floor), statistics.median(ours)
    print(
        f"seconds per round (medians over {len(ours)} rounds each): Flower's floor {a:.2f}, "
        f"with one torch step {t:.2f}, fedleak {b:.2f}\n"
        f"ratio fedleak / floor {b / a:.2f} (target <= 1.3), fedleak / torch floor {b / t:.2f}; "
        "the server collects replies every 3 s (Flower's Grid), so round times come in steps of 3 s"
    )


if __name__ == "__main__":
    main()
