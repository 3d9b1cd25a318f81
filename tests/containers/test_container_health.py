"""deploy/healthcheck.py as Docker runs it: the Ensembler server's gRPC health service."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedleak.models.ensembler import ServerBundle, save_server_bundle, server_net

PORT = 50051
PROBE = ["python", "/app/deploy/healthcheck.py"]
SECOND_NS = 1_000_000_000
SHAPE = (64, 16, 16)  # the server nets' input: the Ensembler head's feature map


def _health(c: Any) -> str:
    c.reload()
    return c.attrs["State"].get("Health", {}).get("Status", "none")


@pytest.mark.containers
def test_ensembler_server_container_turns_healthy(
    fedleak_image: Any, start_container: Any, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    nets = [server_net().eval() for _ in range(2)]  # untrained: health does not need a good model
    bundle = save_server_bundle(ServerBundle(nets, SHAPE, "health-v1"), tmp_path / "server.pt")
    bundle.chmod(0o644)  # written 0600 by root here; the container's user (uid 1000) reads it
    tmp_path.chmod(0o755)
    command = [
        *("python", "-m", "fedleak.server.ensembler_service", "--bundle", "/bundle/server.pt"),
        *("--host", "0.0.0.0", "--port", str(PORT), "--threads", "1", "--insecure"),
    ]
    healthcheck = {
        "test": ["CMD", *PROBE, "ensembler", str(PORT)],
        "interval": 1 * SECOND_NS,
        "timeout": 5 * SECOND_NS,
        "retries": 60,
    }
    server = start_container(
        fedleak_image.tag,
        command=command,
        volumes={str(tmp_path): {"bind": "/bundle", "mode": "ro"}},
        healthcheck=healthcheck,
        init=True,
    )
    deadline = time.monotonic() + 120
    while _health(server) == "starting" and time.monotonic() < deadline:
        time.sleep(1)
    assert _health(server) == "healthy", server.logs()[-2000:].decode()

    # The probe fails, in one line, where nothing serves.
    code, output = server.exec_run([*PROBE, "ensembler", str(PORT + 1), "--timeout", "2"])
    assert code == 1
    assert output.decode().startswith(f"unhealthy: 127.0.0.1:{PORT + 1}")
    code, output = server.exec_run([*PROBE, "superlink", "9093"])
    assert code == 1 and b"Connection refused" in output
