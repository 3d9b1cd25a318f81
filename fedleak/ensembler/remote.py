"""The server as a separate OS process, and the client classifying through it over gRPC.

The experiment never hands the attacker a tensor the client computed: it starts
``python -m fedleak.server.ensembler_service --record DIR`` on the server bundle, the client
classifies its images through ``RemoteEnsemble``, and the attack reads what that process wrote
to DIR.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fedleak.clients.ensembler_tls import ClientTLS
from fedleak.errors import FedleakError
from fedleak.models.ensembler import load_client_bundle
from fedleak.server.ensembler_options import is_loopback

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    popen: subprocess.Popen
    address: str
    log: Path


@contextlib.contextmanager
def server_process(
    bundle: Path,
    record_dir: Path | None,
    log: Path,
    *,
    host: str = "127.0.0.1",
    threads: int = 1,
    device: str = "cpu",
    startup_timeout: float = 120.0,
    extra_args: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Start the service on a free port (it writes the port to a file), stop it on exit.
    ``extra_args``: more of the service's flags (limits, TLS)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    port_file = log.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "fedleak.server.ensembler_service",
        "--bundle",
        str(bundle),
        "--host",
        host,
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--threads",
        str(threads),
        "--device",
        device,
    ]
    if record_dir is not None:
        cmd += ["--record", str(record_dir)]
    if not is_loopback(host):  # the experiment's own client talks plain text to it
        cmd += ["--insecure"]
    cmd += list(extra_args)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    try:
        port = _wait_for_port(popen, port_file, log, startup_timeout)
        yield ServerProcess(popen, f"{host}:{port}", log)
    finally:
        _stop(popen)


def _wait_for_port(popen: subprocess.Popen, port_file: Path, log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise FedleakError(f"the Ensembler server exited with {popen.returncode}; see {log}")
        text = port_file.read_text().strip() if port_file.is_file() else ""
        if text.isdigit():
            return int(text)
        time.sleep(0.2)
    raise FedleakError(f"the Ensembler server did not start within {timeout:.0f} s; see {log}")


def _stop(popen: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM (the service finishes its calls and exits), SIGKILL if it does not."""
    if popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(grace)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


def classify_remote(
    client_path: Path,
    address: str,
    images: Tensor,
    *,
    batch_size: int,
    timeout: float,
    tls: ClientTLS | None = None,
) -> Tensor:
    """The client's side: its bundle, the remote server nets, logits for ``images``; ``tls``:
    plain text when None."""
    from fedleak.clients.ensembler_client import RemoteEnsemble, classify

    client = load_client_bundle(client_path)
    with RemoteEnsemble(address, timeout=timeout, tls=tls) as remote:
        return classify(client, remote, images, batch_size)


def received_features(record_dir: Path, expected: int) -> Tensor:
    """Every feature the server was sent, in arrival order (the client sends in image order)."""
    from fedleak.server.ensembler_service import load_recordings

    records = load_recordings(record_dir)
    if not records:
        raise FedleakError(f"the server recorded nothing in {record_dir}")
    features = torch.cat([f.float() for _, f in records])
    if len(features) != expected:
        raise FedleakError(
            f"the server recorded {len(features)} feature vectors, {expected} were sent"
        )
    return features
