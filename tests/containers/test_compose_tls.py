"""The compose federation with deploy/compose.tls.yml: TLS everywhere, SuperNode authentication,
the Control API behind the proxy. While the authorised run goes on, an outsider on the same
network (holding the CA, as every node does) is refused: a SuperNode with a key that was never
registered, a SuperNode without the CA, and `flwr ls`, `flwr run` and `flwr stop`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from compose_helpers import env_for, run_folder, runs_dir, wait_for_round

pytestmark = pytest.mark.containers

# What the outsider tries, from a container on the federation's network that holds the CA.
OUTSIDER = r"""
mkdir -p /tmp/flwr && cat > /tmp/flwr/config.toml <<'CONF'
[superlink]
default = "public"
[superlink.public]
address = "superlink:9093"
root-certificates = "/certs/set/ca.crt"
CONF
export FLWR_HOME=/tmp/flwr
echo "== ls"; flwr ls --format json 2>&1 | tail -c 600
echo "== stop"; flwr stop "$RUN_ID" 2>&1 | tail -c 400
echo "== run"; flwr run /app public --run-config "run.rounds=1" 2>&1 | tail -c 400
fedleak certs --out /tmp/intruder --hosts intruder --nodes 1 >/dev/null
echo "== unregistered"
timeout 120 flower-supernode --root-certificates /certs/set/ca.crt \
  --auth-supernode-private-key /tmp/intruder/nodes/node-0 --superlink superlink:9093 \
  --max-retries 3 --max-wait-time 60 --node-config 'index=0 role="honest"' 2>&1 | tail -c 600
echo "exit=${PIPESTATUS[0]}"
echo "== no-ca"
timeout 120 flower-supernode --auth-supernode-private-key /certs/set/nodes/node-0 \
  --superlink superlink:9093 --max-retries 3 --max-wait-time 60 \
  --node-config 'index=0 role="honest"' > /tmp/no-ca.log 2>&1
echo "exit=$?"
grep -i -m3 "certificate\|ssl" /tmp/no-ca.log
"""


def test_tls_node_auth_and_a_guarded_control_api(
    fedleak_image: Any, compose: Any, docker_client: Any, tmp_path: Path
) -> None:
    runs = runs_dir(tmp_path)
    env = env_for(runs, FEDLEAK_PRESET="smoke", FEDLEAK_SET="run.rounds=4", FEDLEAK_TLS_NODES="3")
    project = compose("docker-compose.yml", "deploy/compose.tls.yml", env=env)
    outcome: dict = {}
    up = threading.Thread(
        target=lambda: outcome.update(
            result=project.run("up", "--no-build", "--exit-code-from", "experimenter", timeout=1200)
        )
    )
    up.start()
    folder = wait_for_round(runs, 1)
    run_id = str(json.loads((folder / "meta.json").read_text())["flower_run_id"])
    superlink = project.container("superlink")
    network = next(iter(superlink.attrs["NetworkSettings"]["Networks"]))
    certs = next(m["Name"] for m in superlink.attrs["Mounts"] if m["Destination"] == "/certs")
    outsider = docker_client.containers.run(
        fedleak_image.tag,
        command=["bash", "-c", OUTSIDER],
        environment={"RUN_ID": run_id},
        network=network,
        volumes={certs: {"bind": "/certs", "mode": "ro"}},
        labels={"fedleak.tests": "1"},
        detach=True,
    )
    try:
        outsider.wait(timeout=600)
        said = outsider.logs().decode(errors="replace")
    finally:
        outsider.remove(force=True)
    up.join(timeout=1200)
    assert not up.is_alive()
    sections = dict(part.split("\n", 1) for part in said.split("== ")[1:])
    assert "403" in sections["ls"] or '"success": false' in sections["ls"], sections["ls"]
    assert "403" in sections["stop"] and "successfully stopped" not in sections["stop"]
    assert "403" in sections["run"] and "Successfully started" not in sections["run"]
    assert "Failed to activate SuperNode" in sections["unregistered"], sections["unregistered"]
    assert "exit=0" not in sections["unregistered"]
    assert "CERTIFICATE_VERIFY_FAILED" in sections["no-ca"], sections["no-ca"]
    # The authorised run went on and finished, untouched by the outsider.
    assert outcome["result"].returncode == 0, outcome["result"].stdout[-4000:]
    meta = json.loads((run_folder(runs) / "meta.json").read_text())
    assert meta["status"] == "finished"
    rounds = [json.loads(x)["round"] for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3, 4]
