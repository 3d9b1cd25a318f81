"""Benchmark (not a test): the Hitaj GAN attack, active vs passive, on the Simulation Engine.

For each target class it runs `gan-mnist` and `gan-mnist-passive` and prints, from the run
folders: the evaluator's target-class rate on 100 generated images, nearest-neighbour SSIM against
the victim's target class vs other classes, median nearest-real L2 distance (realism), diversity,
when the evaluator rate first reached 80% and when the full success criterion (rate and realism)
first held, rounds and wall time. Usage:

    python benchmarks/gan_attack.py [--targets 0 3] [--minutes 10] [--engine simulation]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from fedleak.federation.console import Console
from fedleak.federation.launcher import launch
from fedleak.report.plots import flat_attack, flat_metrics
from fedleak.runfolder import RunFolder
from fedleak.settings import load_federation


def first(records: list[dict], test) -> dict | None:
    return next((r for r in records if test(r)), None)


def summarize(run_dir: Path, wall: float) -> dict:
    run = RunFolder(run_dir)
    times = {m["round"]: m["time"] for m in run.read_jsonl("metrics.jsonl")}
    scores = [flat_attack(r) for r in run.read_jsonl("attack.jsonl")]
    attack = [r for r in scores if r.get("variant") != "model-inversion" and not r.get("error")]
    mi = [r for r in scores if r.get("variant") == "model-inversion"]
    rate80 = first(attack, lambda r: r["target_rate"] >= 0.8)
    success = first(attack, lambda r: r["success"])
    last = attack[-1] if attack else {}
    metrics = [flat_metrics(r) for r in run.read_jsonl("metrics.jsonl")]
    return {
        "rounds": max(times, default=0),
        "wall_s": wall,
        "status": run.read_json("meta.json", {}).get("status"),
        "rate80_round": rate80 and rate80["round"],
        "rate80_s": rate80 and times.get(rate80["round"]),
        "success_round": success and success["round"],
        "success_s": success and times.get(success["round"]),
        "final": last,
        "final_accuracy": metrics[-1]["test_accuracy"] if metrics else None,
        "final_to_fake": metrics[-1].get("test_to_fake") if metrics else None,
        "model_inversion": mi[-1] if mi else {},
        "dir": str(run_dir),
    }


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--engine", default="simulation")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--presets", nargs="+", default=["gan-mnist", "gan-mnist-passive"])
    args = parser.parse_args()
    rows = []
    for target in args.targets:
        for preset in args.presets:
            settings = load_federation(
                preset,
                [
                    f"participants.1.target-class={target}",
                    f"run.engine={args.engine}",
                    f"run.rounds={args.rounds}",
                    f"run.max-wall-time={args.minutes * 60}",
                    "run.out-dir=runs/benchmark",
                ],
            )
            print(f"== {preset}, target {target}", flush=True)
            start = time.monotonic()
            report, _ = launch(settings, Console("quiet", out=io.StringIO()))
            rows.append((preset, target, summarize(report.parent, time.monotonic() - start)))
            s = rows[-1][2]
            print(f"   done in {s['wall_s']:.0f} s, {s['rounds']} rounds: {s['dir']}", flush=True)
    print()
    print(
        "| preset | target | rounds | wall s | rate>=80% at (round, s) | success at (round, s) "
        "| final rate | NN-SSIM target / other | NN-L2 median | diversity | model acc "
        "| target->fake |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, target, s in rows:
        f = s["final"]
        print(
            f"| {preset} | {target} | {s['rounds']} | {s['wall_s']:.0f} | "
            f"{fmt(s['rate80_round'], 'd')}, {fmt(s['rate80_s'], '.0f')} | "
            f"{fmt(s['success_round'], 'd')}, {fmt(s['success_s'], '.0f')} | "
            f"{fmt(f.get('target_rate'))} | {fmt(f.get('nn_ssim_target'))} / "
            f"{fmt(f.get('nn_ssim_other'))} | {fmt(f.get('nn_l2_median'), '.1f')} | "
            f"{fmt(f.get('diversity'))} | {fmt(s['final_accuracy'], '.3f')} | "
            f"{fmt(s['final_to_fake'])} |"
        )
    mis = [(p, t, s["model_inversion"]) for p, t, s in rows if s["model_inversion"]]
    for preset, target, mi in mis:
        print(
            f"model inversion of the final model ({preset}, target {target}): rate "
            f"{fmt(mi.get('target_rate'))}, NN-SSIM {fmt(mi.get('nn_ssim_target'))}/"
            f"{fmt(mi.get('nn_ssim_other'))}, NN-L2 {fmt(mi.get('nn_l2_median'), '.1f')}"
        )


if __name__ == "__main__":
    main()
