"""A watchdog for one launcher: when the launcher ends without cleaning up (SIGKILL, a crash),
stop every process it started and record that the run lost its launcher.

The launcher starts it in a session of its own, so a signal to the launcher's process group does
not reach it; it holds none of the group's environment token, so the clean-up never kills it.
It polls the launcher's pid (and the kernel's start time of that pid, so a reused pid does not
fool it) once a second and exits by itself once the launcher is gone or told it to.

    python -m fedleak.federation.watchdog --pid PID --start START --token TOKEN --run RUN_DIR
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedleak.federation.processes import TOKEN_VAR, ProcessGroup
from fedleak.runfolder import RunFolder, Status, now_iso, process_start

POLL_SECONDS = 1.0


def alive(pid: int, start: str | None) -> bool:
    return process_start(pid) == start


def clean_up(token: str, run_dir: Path) -> None:
    ProcessGroup({}, token=token).stop(grace=3.0)
    run = RunFolder(run_dir)
    if run.read_json("meta.json", {}).get("status") == Status.RUNNING:
        run.write_meta(
            status=Status.FAILED,
            message="launcher lost: it ended without recording how; its processes were stopped",
            finished=now_iso(),
        )


def watch(pid: int, start: str | None, token: str, run_dir: Path) -> None:
    while alive(pid, start):
        time.sleep(POLL_SECONDS)
    clean_up(token, run_dir)


def start_watchdog(token: str, run_dir: Path, log: Path) -> subprocess.Popen:
    """Start the watchdog for this process (the launcher)."""
    me = os.getpid()
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedleak.federation.watchdog",
                "--pid",
                str(me),
                "--start",
                str(process_start(me)),
                "--token",
                token,
                "--run",
                str(run_dir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def stop_watchdog(watchdog: subprocess.Popen) -> None:
    """The launcher cleaned up itself: the watchdog has nothing left to do."""
    watchdog.send_signal(signal.SIGTERM)
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedleak.federation.watchdog")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--start", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--run", type=Path, required=True)
    args = parser.parse_args(argv)
    watch(args.pid, None if args.start == "None" else args.start, args.token, args.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
