"""Starting and reliably stopping the federation's OS processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
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
    log: Path | None
    reported_exit: bool = False


TOKEN_VAR = "FEDLEAK_PROCESS_GROUP"


def tagged_pids(token: str) -> list[int]:
    """Processes whose environment carries this group's token: everything Flower and Ray
    spawned for us, even those that moved to a session of their own or lost their parent."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


@dataclass
class ProcessGroup:
    """Every process the launcher started, and everything they spawn. Flower's SuperExec
    starts the ServerApp/simulation in a new session, so process groups alone miss them; a
    token in the environment finds them all."""

    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.env = {**self.env, TOKEN_VAR: self.token}

    def start(
        self, name: str, cmd: list[str], log: Path | None, env: dict[str, str] | None = None
    ) -> Proc:
        """Start ``cmd`` in a session of its own, output to ``log`` (None: this process's own
        output, as a container's logs want); ``env`` adds to the group's environment for this
        process only (e.g. its report token)."""
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") if log is not None else contextlib.nullcontext() as out:
            try:
                popen = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT if out is not None else None,
                    stdin=subprocess.DEVNULL,
                    env={**self.env, **(env or {})},
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
        # Ray's agents drop our environment but stay in the simulation's process group.
        groups = _groups(tagged_pids(self.token))
        for proc in self.procs:
            _signal_group(proc.popen, signal.SIGTERM)
        _signal_pids(tagged_pids(self.token), signal.SIGTERM)
        _signal_groups(groups, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc.popen, signal.SIGKILL)
        while tagged_pids(self.token) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_pids(tagged_pids(self.token), signal.SIGKILL)
        _signal_groups(groups, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=2)

    def alive(self) -> list[int]:
        return tagged_pids(self.token)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _groups(pids: list[int]) -> set[int]:
    groups = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(pid))
    groups.discard(os.getpgrp())
    return groups


def _signal_groups(groups: set[int], sig: int) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def tail(path: Path | None, lines: int = 15) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
