"""Starting and reliably stopping the federation's OS processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedleak.errors import FedleakError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as err:
            raise FedleakError(f"port {port} ({what}) is already in use") from err


def pick_ports(requested: int, count: int, what: str) -> list[int]:
    """`count` ports starting at `requested`, or free ones when `requested` is 0."""
    if requested == 0:
        ports: list[int] = []
        while len(ports) < count:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return ports
    ports = list(range(requested, requested + count))
    for port in ports:
        ensure_port_free(port, what)
    return ports


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    reported_exit: bool = False


@dataclass
class ProcessGroup:
    """Every process the launcher started; each in its own session so that stopping it also
    stops the ServerApp/ClientApp processes Flower spawns beneath it."""

    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], log: Path) -> Proc:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            try:
                popen = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.env,
                    start_new_session=True,
                )
            except FileNotFoundError as err:
                raise FedleakError(
                    f"cannot start {name}: {cmd[0]} not found (is flwr installed?)"
                ) from err
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def newly_exited(self) -> list[Proc]:
        gone = []
        for proc in self.procs:
            if not proc.reported_exit and proc.popen.poll() is not None:
                proc.reported_exit = True
                gone.append(proc)
        return gone

    def stop(self, grace: float = 5.0) -> None:
        for proc in self.procs:
            _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc.popen, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=2)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
