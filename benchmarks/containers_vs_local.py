"""Seconds per round of the same preset as containers (docker-compose.yml) and as local processes
(`fedleak run --set run.engine=deployment`), in one run, plus the image's size and how long a
rebuild takes after a code change.

Both sides run the same preset with the same participants (compose's default: one honest, one
attacker) on the Deployment Engine. They alternate (local, containers, local, ...) so that a
change in the machine's load hits both alike. Seconds per round come from the server's own
round records (`time` in metrics.jsonl), from round 1 to the last, so start-up (image start,
evaluator training) is not counted; it is printed separately as wall time.

Needs a Docker engine and the image (`bash .ci/docker-setup.sh`) and the data root
(FEDLEAK_DATA_ROOT, or ../shared/data beside the checkout).

    python benchmarks/containers_vs_local.py                   # smoke, 6 rounds, 2 repetitions
    python benchmarks/containers_vs_local.py --rounds 8 --repeat 3 --no-rebuild
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    root = os.environ.get("FEDLEAK_DATA_ROOT") or str(REPO.parent / "shared" / "data")
    if not Path(root).is_dir():
        sys.exit(f"no data root at {root}: set FEDLEAK_DATA_ROOT")
    return Path(root).resolve()


def per_round(folder: Path) -> float:
    """Median seconds between consecutive round records after round 1."""
    times = [json.loads(x)["time"] for x in (folder / "metrics.jsonl").read_text().splitlines()]
    gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    if not gaps:
        raise RuntimeError(f"{folder}: fewer than 3 round records")
    return statistics.median(gaps)


def only_run(runs: Path) -> Path:
    (folder,) = [p for p in runs.iterdir() if (p / "meta.json").exists()]
    status = json.loads((folder / "meta.json").read_text())["status"]
    if status != "finished":
        raise RuntimeError(f"{folder}: the run ended {status}")
    return folder


def local(preset: str, rounds: int, work: Path) -> tuple[float, float]:
    runs = work / f"local-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedleak.cli",
            "run",
            preset,
            "--quiet",
            "--set",
            "run.engine=deployment",
            "--set",
            f"run.rounds={rounds}",
            "--set",
            f'run.out-dir="{runs}"',
        ],
        check=True,
        env={**os.environ, "FEDLEAK_DATA_ROOT": str(data_root())},
        stdout=subprocess.DEVNULL,
    )
    return per_round(only_run(runs)), time.monotonic() - started


def compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def containers(preset: str, rounds: int, work: Path, image: str) -> tuple[float, float]:
    runs = work / f"containers-{uuid.uuid4().hex[:6]}"
    runs.mkdir()
    runs.chmod(0o777)  # the containers' user writes the run folder
    env = {
        **os.environ,
        "FEDLEAK_DATA": str(data_root()),
        "FEDLEAK_RUNS": str(runs),
        "FEDLEAK_PRESET": preset,
        "FEDLEAK_SET": f"run.rounds={rounds}",
        "FEDLEAK_IMAGE": image,
        "FEDLEAK_REPORT_TOKEN": uuid.uuid4().hex,
    }
    project = ["-p", f"fedleakbench{uuid.uuid4().hex[:6]}", "-f", str(REPO / "docker-compose.yml")]
    started = time.monotonic()
    try:
        subprocess.run(
            [*compose_cmd(), *project, "up", "--no-build", "--exit-code-from", "experimenter"],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.monotonic() - started
    finally:
        subprocess.run(
            [*compose_cmd(), *project, "down", "-v", "--timeout", "5"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    return per_round(only_run(runs)), wall


def image_size(image: str) -> int:
    out = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Size}}", image],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def rebuild_after_a_code_change(work: Path) -> float:
    """Copy the checkout, change one source file, build the image from the copy (the layer
    cache is the real one) and time it; the extra tag is removed afterwards."""
    tree = work / "tree"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    changed = tree / "fedleak" / "__init__.py"
    changed.write_text(changed.read_text() + f"\n# benchmark edit {uuid.uuid4().hex}\n")
    tag = f"fedleak:rebuild-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    subprocess.run(
        ["bash", ".ci/docker-setup.sh"],
        cwd=tree,
        env={**os.environ, "FEDLEAK_IMAGE": tag},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - started
    subprocess.run(["docker", "rmi", tag], capture_output=True, check=False)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--image", default=os.environ.get("FEDLEAK_IMAGE", "fedleak:dev"))
    parser.add_argument("--no-rebuild", action="store_true", help="skip the rebuild timing")
    args = parser.parse_args()
    sides = {"local processes": local, "containers": containers}
    found: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="fedleak-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        for rep in range(args.repeat):
            for name, fn in sides.items():
                extra = (args.image,) if name == "containers" else ()
                sec, wall = fn(args.preset, args.rounds, work, *extra)
                found[name].append((sec, wall))
                print(f"repeat {rep + 1} {name:16s} {sec:6.2f} s/round  (wall {wall:5.0f} s)")
        rebuild = None if args.no_rebuild else rebuild_after_a_code_change(work)
    print(f"\n{args.preset}, {args.rounds} rounds, {args.repeat} repetitions (medians):")
    med = {name: statistics.median(s for s, _ in runs) for name, runs in found.items()}
    wall = {name: statistics.median(w for _, w in runs) for name, runs in found.items()}
    for name in sides:
        print(f"  {name:16s} {med[name]:6.2f} s/round   wall {wall[name]:5.0f} s")
    ratio = med["containers"] / med["local processes"]
    print(f"  ratio containers / local processes: {ratio:.2f}x (target <= 1.2x)")
    print(f"image {args.image}: {image_size(args.image) / 1e9:.2f} GB")
    if rebuild is not None:
        print(f"rebuild after a one-line code change: {rebuild:.0f} s")


if __name__ == "__main__":
    main()
