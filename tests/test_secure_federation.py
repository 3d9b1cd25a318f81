"""A secure federation on loopback, with real processes: flower-superlink with TLS and SuperNode
authentication bound to 127.0.0.1, Debian's nginx in front of it (the only public port), the
experimenter's nginx sidecar holding the Control API client certificate, two registered
SuperNodes running fedleak's app (2 rounds of `smoke`), and an outsider who knows the public
address and holds the CA certificate (every node gets it), but no key or client certificate.

What loopback cannot show: in a real deployment the outsider cannot reach the SuperLink's own
port at all (it listens on the server's loopback); here every process shares one loopback, so
the outsider is simply only ever pointed at the proxy's port.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomli_w

from fedleak import certs
from fedleak.certs import Bundle, NodeCredentials, ServerTLS
from fedleak.federation.collector import Collector
from fedleak.federation.launcher import (
    app_dir,
    flower_env,
    flwr,
    report_tokens,
    run_status,
    start_superlink,
    start_supernode,
    submit,
    write_connection,
)
from fedleak.federation.processes import ProcessGroup, pick_ports, tagged_pids
from fedleak.federation.proxy import (
    ExperimenterSidecar,
    SuperLinkProxy,
    render_experimenter_sidecar,
    render_superlink_proxy,
    start_nginx,
    wait_https_healthy,
    wait_listening,
    write_config,
)
from fedleak.federation.scoring import Scoring
from fedleak.reporting import TOKEN_ENV
from fedleak.runfolder import RunFolder
from fedleak.settings import load_federation
from fedleak.settings.flower import node_config_arg, to_node_config

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install -y nginx)"
)
PROBE_LIMIT = 60.0  # a refused SuperNode must have exited by then (measured: 2-5 s)
RUN_LIMIT = 420.0


@dataclass
class Probe:
    """One refused attempt: what was run, its exit code, what it printed, how long it took."""

    what: str
    code: int | None
    output: str
    seconds: float


@dataclass
class Outcome:
    bundle: Bundle
    run: RunFolder
    run_id: int
    status_during_probes: str
    final_status: str
    nodes: list[dict]
    intruder: Probe
    no_ca: Probe
    outsider: dict[str, Probe] = field(default_factory=dict)
    http: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    token: str = ""
    elapsed: float = 0.0


def wait_exit(procs: ProcessGroup, name: str, limit: float, started: float) -> Probe:
    """Wait for a process that must give up by itself; `started` is when it was launched."""
    proc = next(p for p in procs.procs if p.name == name)
    try:
        code = proc.popen.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        code = None  # still running: the assertion reports a hang
    return Probe(name, code, proc.log.read_text(errors="replace"), time.monotonic() - started)


def cli(env: dict[str, str], *args: str) -> Probe:
    started = time.monotonic()
    result = flwr(env, *args, timeout=120)
    return Probe(
        "flwr " + " ".join(args),
        result.returncode,
        result.stdout + result.stderr,
        time.monotonic() - started,
    )


def post(url: str, ca: Path, client: tuple[Path, Path] | None = None) -> int:
    """Status of an empty protobuf POST (a valid request for list-runs and acquire-task)."""
    context = ssl.create_default_context(cafile=str(ca))
    if client:
        context.load_cert_chain(*client)
    request = urllib.request.Request(
        url, data=b"", method="POST", headers={"content-type": "application/protobuf"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def outsider_home(root: Path, proxy_port: int, ca: Path) -> dict[str, str]:
    home = root / "outsider-flwr-home"
    home.mkdir(parents=True)
    conf = {
        "superlink": {
            "default": "public",
            "public": {"address": f"localhost:{proxy_port}", "root-certificates": str(ca)},
        }
    }
    (home / "config.toml").write_text(tomli_w.dumps(conf))
    return {"FLWR_HOME": str(home)}


def register(env: dict[str, str], public_key: Path) -> int:
    result = flwr(env, "supernode", "register", str(public_key), "fedleak", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    return int(json.loads(result.stdout)["node-id"])


@pytest.fixture(scope="module")
def secure(tmp_path_factory, data_root) -> Outcome:
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: apt-get install -y nginx)")
    started = time.monotonic()
    root = tmp_path_factory.mktemp("secure")
    # node-0/1: the participants; node-2: never registered; node-3: registered, started without
    # the CA. `auditor` holds a valid client certificate that the proxy does not list.
    certs.generate(root / "certs", "localhost", nodes=4, clients=["experimenter", "auditor"])
    certs.generate(root / "foreign", "localhost", nodes=0)
    bundle = Bundle(root / "certs")
    run = RunFolder(root / "runs" / "secure")
    # The roles report to an in-process collector, as `fedleak run` serves it.
    settings = load_federation(
        "smoke",
        [
            f'run.out-dir="{root / "runs"}"',
            "run.engine=deployment",
            f'data.root="{data_root}"',
            "run.rounds=2",
            "attack.num-samples=20",
            f'deployment.node-root="{run.path / "participants"}"',
        ],
    )
    grants, tokens = report_tokens(settings)
    collector = Collector(run.path / "inbox", grants).start()
    address = f"127.0.0.1:{collector.port}"
    settings = settings.model_copy(
        update={"deployment": settings.deployment.model_copy(update={"collector": address})}
    )
    internal, public, sidecar_port, node0, node1, node2, node3 = pick_ports(0, 7, "test")
    # Module-scoped, so conftest's per-test environment is not in place yet: set it here.
    procs = ProcessGroup({**flower_env(run), "FEDLEAK_CACHE_DIR": str(root / "cache")})
    env = procs.env
    outsider_env = {**env, **outsider_home(root, public, bundle.ca)}
    try:
        start_superlink(
            procs,
            internal,
            run.path / "logs",
            simulation=False,
            env={TOKEN_ENV: tokens["server"]},
            tls=ServerTLS.from_bundle(bundle.root),
            node_auth=True,
        )
        proxy = SuperLinkProxy(
            listen=f"127.0.0.1:{public}",
            upstream=f"127.0.0.1:{internal}",
            tls=ServerTLS.from_bundle(bundle.root),
            control_clients=("experimenter",),
        )
        proxy_proc = start_nginx(
            procs, "proxy", render_superlink_proxy(proxy, root / "proxy"), root / "proxy"
        )
        wait_https_healthy(proxy_proc, f"https://localhost:{public}/health", bundle.ca)
        client_cert, client_key = bundle.client("experimenter")
        sidecar = ExperimenterSidecar(
            f"127.0.0.1:{sidecar_port}", f"localhost:{public}", client_cert, client_key, bundle.ca
        )
        sidecar_proc = start_nginx(
            procs,
            "sidecar",
            render_experimenter_sidecar(sidecar, root / "sidecar"),
            root / "sidecar",
        )
        wait_listening(sidecar_proc, sidecar.listen)
        # The experimenter's flwr CLI talks to its sidecar (loopback); everything else is TLS.
        write_connection(run, f"127.0.0.1:{sidecar_port}")
        for i in (0, 1, 3):
            register(env, bundle.node_public_key(i))

        logs = run.path / "logs"
        probes_started = time.monotonic()
        start_supernode(
            procs,
            public,
            node2,
            'index=0 role="honest" classes="0-4"',
            "intruder",
            logs / "intruder.log",
            env={},
            credentials=NodeCredentials(ca=bundle.ca, key=bundle.node_key(2)),
            superlink_host="localhost",
            max_retries=2,
            max_wait_time=20,
        )
        start_supernode(
            procs,
            public,
            node3,
            'index=0 role="honest" classes="0-4"',
            "no-ca",
            logs / "no-ca.log",
            env={},
            credentials=NodeCredentials(ca=None, key=bundle.node_key(3)),
            superlink_host="localhost",
            max_retries=2,
            max_wait_time=20,
        )
        intruder = wait_exit(procs, "intruder", PROBE_LIMIT, probes_started)
        no_ca = wait_exit(procs, "no-ca", PROBE_LIMIT, probes_started)

        for spec, port in zip(settings.specs(), (node0, node1), strict=True):
            start_supernode(
                procs,
                public,
                port,
                node_config_arg(to_node_config(spec, settings.attack)),
                f"supernode {spec.index} ({spec.role})",
                logs / f"supernode-{spec.index}-{spec.role}.log",
                env={TOKEN_ENV: tokens[f"participant-{spec.index}"]},
                credentials=NodeCredentials(ca=bundle.ca, key=bundle.node_key(spec.index)),
                superlink_host="localhost",
                max_retries=5,
                max_wait_time=60,
            )
        run_id = submit(run, settings, env)

        # The outsider acts while the run is under way.
        deadline = time.monotonic() + 120
        while (status := run_status(env, run_id)) != "running" and time.monotonic() < deadline:
            time.sleep(1)
        outcome = Outcome(bundle, run, run_id, status, "", [], intruder, no_ca)
        app = str(app_dir())
        outcome.outsider = {
            "ls": cli(outsider_env, "ls", "public", "--format", "json"),
            "run": cli(outsider_env, "run", app, "public", "--run-config", "run.rounds=1"),
            "stop": cli(outsider_env, "stop", str(run_id), "public"),
            "log": cli(outsider_env, "log", str(run_id), "public", "--show"),
            "register": cli(
                outsider_env, "supernode", "register", str(bundle.node_public_key(2)), "public"
            ),
        }
        base = f"https://localhost:{public}"
        outcome.http = {
            "runtime acquire-task": post(f"{base}/v1/runtime/acquire-task", bundle.ca),
            "control, foreign CA cert": post(
                f"{base}/v1/control/list-runs",
                bundle.ca,
                Bundle(root / "foreign").client("experimenter"),
            ),
            "control, unlisted cert": post(
                f"{base}/v1/control/list-runs", bundle.ca, bundle.client("auditor")
            ),
            "control, experimenter cert": post(
                f"{base}/v1/control/list-runs", bundle.ca, bundle.client("experimenter")
            ),
        }

        deadline = time.monotonic() + RUN_LIMIT
        status = run_status(env, run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(3)
            status = run_status(env, run_id)
        outcome.final_status = status
        nodes = flwr(env, "supernode", "list", "fedleak", "--format", "json", timeout=60)
        outcome.nodes = json.loads(nodes.stdout).get("nodes", []) if nodes.returncode == 0 else []
        if not status.startswith("finished"):
            flwr(env, "stop", str(run_id), "fedleak", timeout=30)
        server_log = flwr(env, "log", str(run_id), "fedleak", "--show", timeout=60)
        (run.path / "logs" / "serverapp.log").write_text(server_log.stdout + server_log.stderr)
    finally:
        procs.stop()
        collector.stop()
    Scoring(run, settings).poll()  # the experimenter's side: round metrics from the inbox
    outcome.token = procs.token
    outcome.logs = {
        name: path.read_text(errors="replace")
        for name, path in {
            "superlink": run.path / "logs" / "superlink.log",
            "serverapp": run.path / "logs" / "serverapp.log",
            "proxy": root / "proxy" / "access.log",
        }.items()
        if path.exists()
    }
    outcome.elapsed = time.monotonic() - started
    print(f"\nsecure federation: {outcome.elapsed:.0f} s in all, run {outcome.final_status}")
    for probe in (outcome.intruder, outcome.no_ca, *outcome.outsider.values()):
        marks = ("403", "rror", "Failed")
        last = [ln for ln in probe.output.splitlines() if any(m in ln for m in marks)][-2:]
        print(f"  {probe.what}: exit {probe.code} after {probe.seconds:.1f} s: {' | '.join(last)}")
    for what, code in outcome.http.items():
        print(f"  HTTP {what}: {code}")
    return outcome


CONTROL_PATHS = ("start-run", "stop-run", "stream-logs", "register-node")


def requests(access_log: str, control_path: str) -> int:
    return access_log.count(f'"POST /v1/control/{control_path} HTTP/1.1"')


def refused(probe: Probe) -> bool:
    # Measured: with --format json, flwr prints {"success": false, ...} and exits 0.
    failed = probe.code not in (0, None) or '"success": false' in probe.output
    return failed and "403 Forbidden" in probe.output


@needs_nginx
@pytest.mark.integration
def test_unregistered_key_is_refused(secure):
    probe = secure.intruder
    assert probe.code not in (0, None), f"intruder still running after {PROBE_LIMIT} s"
    assert "Failed to activate SuperNode" in probe.output, probe.output[-2000:]
    assert probe.seconds < PROBE_LIMIT
    ids = [str(n.get("node-id", n.get("node_id"))) for n in secure.nodes]
    assert len(ids) == 3, secure.nodes  # node-0, node-1, node-3: never the intruder's key


@needs_nginx
@pytest.mark.integration
def test_node_without_the_ca_cannot_connect(secure):
    probe = secure.no_ca
    assert probe.code not in (0, None), (
        f"SuperNode without the CA still running after {PROBE_LIMIT} s"
    )
    assert "CERTIFICATE_VERIFY_FAILED" in probe.output, probe.output[-2000:]
    assert probe.seconds < PROBE_LIMIT


@needs_nginx
@pytest.mark.integration
def test_outsider_control_commands_are_refused(secure):
    assert secure.status_during_probes == "running", secure.status_during_probes
    for probe in secure.outsider.values():
        assert refused(probe), f"outsider's {probe.what}: {probe.output[-1500:]}"
    # Refused at the proxy: none of them reached the SuperLink. The only Control calls of these
    # kinds it saw are the experimenter's: one run, three node registrations.
    calls = {path: requests(secure.logs["superlink"], path) for path in CONTROL_PATHS}
    # stream-logs: the experimenter's `flwr log` after the run.
    assert calls == {"start-run": 1, "stop-run": 0, "stream-logs": 1, "register-node": 3}
    assert secure.http == {
        "runtime acquire-task": 404,
        "control, foreign CA cert": 400,
        "control, unlisted cert": 403,
        "control, experimenter cert": 200,
    }


@needs_nginx
@pytest.mark.integration
def test_run_finishes_with_the_authorised_nodes(secure):
    assert secure.final_status == "finished:completed", secure.logs.get("serverapp")
    metrics = secure.run.read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(m["participants"] == 1 and m["rejected"] == 0 for m in metrics[1:]), metrics
    assert all(0 <= m["test_accuracy"] <= 1 for m in metrics)
    # The SuperNodes reached the SuperLink only through the proxy's Fleet route.
    fleet = [ln for ln in secure.logs["proxy"].splitlines() if "/v1/fleet/pull-messages" in ln]
    assert fleet and all(" 200 " in ln for ln in fleet[-10:])
    online = [n for n in secure.nodes if n.get("status") == "online"]
    assert len(online) == 2, secure.nodes


@needs_nginx
@pytest.mark.integration
def test_nothing_left_running(secure):
    assert tagged_pids(secure.token) == []


def test_proxy_config_renders_and_nginx_accepts_it(tmp_path):
    certs.generate(tmp_path / "c", "superlink.example,10.0.0.5", nodes=0)
    tls = ServerTLS.from_bundle(tmp_path / "c")
    proxy = SuperLinkProxy("0.0.0.0:9093", "127.0.0.1:9091", tls, ("experimenter", "ci"))
    text = render_superlink_proxy(proxy, tmp_path / "p")
    assert "@{" not in text
    assert '"SUCCESS:CN=experimenter,O=fedleak" 1;' in text
    assert '"SUCCESS:CN=ci,O=fedleak" 1;' in text
    assert "server 127.0.0.1:9091;" in text and "listen 0.0.0.0:9093 ssl;" in text
    assert "location /v1/runtime/" not in text  # refused by the catch-all
    client = Bundle(tmp_path / "c").client("experimenter")
    # nginx resolves the upstream when it starts, so `nginx -t` needs a name that resolves here.
    side = ExperimenterSidecar(
        "127.0.0.1:9095", "127.0.0.1:9093", *client, tls.ca, "superlink.example"
    )
    side_text = render_experimenter_sidecar(side, tmp_path / "s")
    assert "proxy_ssl_name superlink.example;" in side_text
    assert "server 127.0.0.1:9093;" in side_text
    if NGINX is None:
        pytest.skip("nginx is not installed; rendering checked, `nginx -t` not run")
    for name, conf in (("p", text), ("s", side_text)):
        path = write_config(conf, tmp_path / name)
        check = subprocess.run(
            [NGINX, "-t", "-p", str(tmp_path / name), "-c", str(path), "-e", "/dev/stderr"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr


def test_sidecar_must_listen_on_loopback(tmp_path):
    from fedleak.errors import ConfigError

    certs.generate(tmp_path / "c", "localhost", nodes=0)
    b = Bundle(tmp_path / "c")
    side = ExperimenterSidecar("0.0.0.0:9095", "localhost:9093", *b.client("experimenter"), b.ca)
    with pytest.raises(ConfigError, match="loopback only"):
        render_experimenter_sidecar(side, tmp_path / "s")
    by_ip = ExperimenterSidecar("127.0.0.1:9095", "10.0.0.5:9093", *b.client("experimenter"), b.ca)
    with pytest.raises(ConfigError, match="10.0.0.5: nginx verifies DNS names only"):
        render_experimenter_sidecar(by_ip, tmp_path / "s")


def test_proxy_command_line(tmp_path, capsys):
    from fedleak.federation import proxy

    certs.generate(tmp_path / "c", "superlink", nodes=0)
    args = ["--certs", str(tmp_path / "c"), "--out", str(tmp_path / "p")]
    assert proxy.main(["superlink", "--upstream", "127.0.0.1:9091", *args]) == 0
    assert "upstream fedleak_superlink" in (tmp_path / "p" / "nginx.conf").read_text()
    assert f"run: nginx -p {tmp_path / 'p'}" in capsys.readouterr().out
    side = ["--certs", str(tmp_path / "c"), "--out", str(tmp_path / "s")]
    assert proxy.main(["sidecar", "--remote", "10.0.0.5:9093", *side]) == 2
    assert "nginx verifies DNS names only" in capsys.readouterr().err
    assert not (tmp_path / "s" / "nginx.conf").exists()
