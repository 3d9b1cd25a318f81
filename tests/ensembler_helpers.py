"""What the Ensembler service tests share: small bundles, and the service as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedleak.models.ensembler import (
    ClientBundle,
    Head,
    ServerBundle,
    Tail,
    gaussian_noise,
    load_server_bundle,
    save_client_bundle,
    save_server_bundle,
    server_net,
)
from fedleak.server.ensemble_runner import EnsembleRunner

REPO = Path(__file__).resolve().parents[1]
SHAPE = (64, 16, 16)
MAX_BATCH = 8


def make_bundles(tmp: Path, num_nets: int = 2) -> tuple[Path, Path]:
    torch.manual_seed(7)
    nets = [server_net().eval() for _ in range(num_nets)]
    server = save_server_bundle(ServerBundle(nets, SHAPE, "test-v1"), tmp / "server.pt")
    client = ClientBundle(
        Head().eval(),
        gaussian_noise(SHAPE, 0.1, 1),
        Tail(num_nets).eval(),
        [1],
        num_nets,
        "test-v1",
    )
    return server, save_client_bundle(client, tmp / "client.pt")


# Fixtures for the test modules that import them (pytest finds a fixture by its name there).


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    """(server bundle, client bundle) of two small nets."""
    return make_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def reference(bundles) -> EnsembleRunner:
    """The same nets in this process: what a server must answer."""
    return EnsembleRunner(load_server_bundle(bundles[0]).nets, "cpu", mode="loop")


class ServerProcess:
    """``python -m fedleak.server.ensembler_service`` on a free loopback port; ``args`` are
    added to its command line."""

    def __init__(self, tmp: Path, bundle: Path, *args: str) -> None:
        self.port_file, self.record, self.log = tmp / "port", tmp / "record", tmp / "server.log"
        cmd = [sys.executable, "-m", "fedleak.server.ensembler_service", "--bundle", str(bundle)]
        cmd += ["--threads", "1", "--port-file", str(self.port_file), "--record", str(self.record)]
        cmd += ["--max-batch", str(MAX_BATCH), "--device", "cpu", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log, "wb") as log:  # a file, not a pipe: 500 rejections log 500 lines
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"server did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.port = int(self.port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def leftovers(self) -> list[int]:
        """Processes still running whose command line names this server's port file."""
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(self.port_file).encode() in cmdline.read_bytes():
                    pids.append(int(cmdline.parent.name))
            except OSError:  # it ended while we looked
                pass
        return pids

    def stop_and_check(self) -> str:
        """Stop it; it must exit 0, leave no process and log no traceback. Returns the log."""
        assert self.stop() == 0, "SIGTERM must stop the server cleanly"
        assert self.leftovers() == []
        log = self.log.read_text()
        assert "Traceback" not in log, log
        return log
