"""One piece of a federation at a time, for containers and for many machines.

- ``fedleak superlink``: a SuperLink with fedleak's defaults; with TLS, node authentication and
  (optionally) the nginx proxy that guards its Control API (see deploy/SECURITY.md).
- ``fedleak node``: one participant's SuperNode. Its identity (role, classes, attack settings)
  comes from a preset (``PRESET --participant I``) or from the experimenter (``--enroll``), so
  identical containers can take distinct participants.

Each runs in the foreground until its processes end, and stops them on SIGTERM/SIGINT (a
container's ``docker stop``).
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fedleak.errors import FedleakError
from fedleak.reporting import CA_ENV, SERVER_NAME_ENV
from fedleak.settings.flower import node_config_arg

ENROLL_WAIT = 300.0  # seconds a node keeps asking an experimenter that is not up yet


@dataclass(frozen=True)
class NodeIdentityFile:
    """Where an enrolled node keeps its enrollment, so a restarted container is the same
    participant (its nonce, and the node config it was given)."""

    folder: Path

    @property
    def path(self) -> Path:
        return self.folder / "enrollment.json"

    def nonce(self) -> str:
        try:
            return str(json.loads(self.path.read_text())["nonce"])
        except (OSError, ValueError, KeyError):
            return uuid.uuid4().hex

    def save(self, nonce: str, participant: int, node: dict) -> None:
        from fedleak.runfolder import atomic_write_text

        text = json.dumps({"nonce": nonce, "participant": participant, "node": node})
        atomic_write_text(self.path, text)


def enroll(
    address: str, role: str, participant: int, token: str, nonce: str, wait: float = ENROLL_WAIT
) -> tuple[int, dict]:
    """Ask the experimenter's collector at ``address`` who this node is; retried with backoff
    while the experimenter is not up yet, refusals reported at once."""
    import grpc

    from fedleak.proto import collector_pb2 as pb
    from fedleak.proto import collector_pb2_grpc as pb_grpc

    ca = os.environ.get(CA_ENV)
    options = []
    if os.environ.get(SERVER_NAME_ENV):
        options.append(("grpc.ssl_target_name_override", os.environ[SERVER_NAME_ENV]))
    if ca:
        creds = grpc.ssl_channel_credentials(Path(ca).read_bytes())
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    stub = pb_grpc.CollectorStub(channel)
    request = pb.EnrollRequest(token=token, role=role, participant=participant, nonce=nonce)
    deadline, delay = time.monotonic() + wait, 1.0
    while True:
        try:
            reply = stub.Enroll(request, timeout=10)
            return reply.participant, json.loads(reply.node_config_json)
        except grpc.RpcError as err:
            code = err.code()
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise FedleakError(
                    f"the experimenter at {address} refused: {err.details()}"
                ) from None
            if time.monotonic() + delay > deadline:
                raise FedleakError(
                    f"no experimenter answered at {address} within {wait:.0f} s "
                    f"({err.details()}); is `fedleak run --superlink ...` running?"
                ) from None
            print(f"fedleak node: waiting for the experimenter at {address}", flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def with_node_folders(node: dict, node_root: str) -> dict:
    """Node-local folders under ``node_root`` unless the node config names its own."""
    node = dict(node)
    if not node.get("out-dir"):
        node["out-dir"] = f"{node_root}/{node['index']}-{node['role']}"
    if not node.get("state-dir"):
        node["state-dir"] = f"{node['out-dir']}/state"
    return node


def supernode_command(
    node: dict,
    superlink: str,
    root_certificates: str = "",
    auth_key: str = "",
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    runtime_port: int = 9094,
) -> list[str]:
    security = (
        ["--insecure"] if not root_certificates else ["--root-certificates", root_certificates]
    )
    if auth_key:
        security += ["--auth-supernode-private-key", auth_key]
    retry = [] if max_retries is None else ["--max-retries", str(max_retries)]
    retry += [] if max_wait_time is None else ["--max-wait-time", str(max_wait_time)]
    return [
        "flower-supernode",
        *security,
        "--superlink",
        superlink,
        *retry,
        "--port",  # the local Runtime API its ClientApps talk to (Flower's default is 9094)
        str(runtime_port),
        "--node-config",
        node_config_arg(node),
    ]


def superlink_command(
    host: str, port: int, tls_dir: str = "", node_auth: bool = False, database: str = ""
) -> list[str]:
    if node_auth and not tls_dir:
        raise FedleakError("--node-auth needs --tls (Flower authenticates SuperNodes over TLS)")
    cmd = ["flower-superlink", "--disable-runtime-dependency-installation"]
    if tls_dir:
        from fedleak.certs import Bundle, ServerTLS

        tls = ServerTLS.from_bundle(Bundle(Path(tls_dir)).root)
        tls.check(host="127.0.0.1")
        cmd += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        cmd += ["--ssl-ca-certfile", str(tls.ca)]
    else:
        cmd.append("--insecure")
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", database]
    return [*cmd, "--host", host, "--port", str(port)]


def run_foreground(commands: dict[str, list[str]]) -> int:
    """Run these processes, their output on this one's, until one ends (then stop the others)
    or a signal arrives; returns the first one's exit code. What a container's entrypoint
    needs: `docker stop` stops them all, `docker logs` shows them all."""
    from fedleak.federation.processes import ProcessGroup

    procs = ProcessGroup(dict(os.environ))
    stopping = {"signal": 0}

    def stop(signum: int, frame: object) -> None:
        stopping["signal"] = signum

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for name, cmd in commands.items():
            proc = procs.start(name, cmd, None)
            print(f"fedleak: started {name} (pid {proc.popen.pid})", flush=True)
        while not stopping["signal"]:
            for proc in procs.newly_exited():
                code = proc.popen.returncode
                print(f"fedleak: {proc.name} exited (code {code})", flush=True)
                return code or 1
            time.sleep(0.5)
        print(f"fedleak: stopping on signal {stopping['signal']}", flush=True)
        return 0
    finally:
        procs.stop()
