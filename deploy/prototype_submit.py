"""The prototype's submitter (deploy/prototype-compose.yml): submit a preset to a remote SuperLink
with `flwr run`, follow it with `flwr ls`, and exit 0 only when Flower says it completed.

    python /app/deploy/prototype_submit.py smoke --superlink superlink:9093 --set run.rounds=2

It reuses the launcher's submission (the same run config and `flwr run` call as `fedleak run
--set run.engine=deployment`) but not its processes: the SuperLink and the SuperNodes are other
containers. The ServerApp writes the run folder (--run-dir) on the SuperLink's host; scoring and
the report need the results channel that `fedleak run --collector-listen` will add.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from fedleak.config import load_preset
from fedleak.errors import FedleakError
from fedleak.launcher import CONNECTION, FINISHED, flwr, run_status, submit
from fedleak.runfolder import RunFolder


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--run-dir",
        default=os.environ.get("FEDLEAK_RUN_DIR", ""),
        help="run folder on the SuperLink's host (default $FEDLEAK_RUN_DIR, else "
        "/runs/<time>-<preset>)",
    )
    p.add_argument("--timeout", type=float, default=0, help="seconds; 0 = run.max-wall-time")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between `flwr ls` calls")
    return p


def flower_home(superlink: str) -> dict[str, str]:
    """An environment whose FLWR_HOME names the remote SuperLink as connection `fedleak`."""
    home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
    link = {"address": superlink, "insecure": True}  # the prototype has no TLS yet
    conf = {"superlink": {"default": CONNECTION, CONNECTION: link}}
    (home / "config.toml").write_text(tomli_w.dumps(conf))
    return dict(os.environ, FLWR_HOME=str(home))


def follow(env: dict[str, str], run_id: int, timeout: float, poll: float) -> str:
    """Flower's final status of the run (`finished:completed`, `finished:failed`, ...)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        status = run_status(env, run_id)
        if status != last:
            print(f"submitter: run {run_id} {status}", flush=True)
            last = status
        if status.startswith(FINISHED):
            return status
        time.sleep(poll)
    flwr(env, "stop", str(run_id), CONNECTION, timeout=30)
    return f"stopped after {timeout:.0f} s"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_preset(args.preset, [*args.overrides, "run.engine=deployment"])
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg["run"]["dir"] = args.run_dir or f"/runs/{stamp}-{args.preset}"
        env = flower_home(args.superlink)
        started = time.monotonic()
        # submit() writes the run config it sends beside a local run folder of its own.
        local = RunFolder(tempfile.mkdtemp(prefix="submitter-"))
        run_id = submit(local, cfg, env)
    except FedleakError as err:
        print(f"submitter: {err}", file=sys.stderr)
        return 2
    print(
        f"submitter: run {run_id} submitted to {args.superlink} ({cfg['run']['rounds']} rounds, "
        f"run folder {cfg['run']['dir']} on the SuperLink)",
        flush=True,
    )
    status = follow(env, run_id, args.timeout or cfg["run"]["max-wall-time"], args.poll)
    seconds = time.monotonic() - started
    log = flwr(env, "log", str(run_id), CONNECTION, "--show", timeout=60)
    print(log.stdout.rstrip(), flush=True)
    ok = status == f"{FINISHED}:completed"
    print(f"submitter: run {run_id} {status} after {seconds:.1f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
