"""``fedleak run``: a real federation of separate processes, and the experimenter around it.

Locally (the default) it starts a Flower SuperLink and one SuperNode per participant (Deployment
Engine) or a simulation SuperLink (Simulation Engine). Against a remote SuperLink
(``--superlink``) it starts nothing: the SuperLink and the participants' SuperNodes run elsewhere
(containers, other hosts). Either way it serves the collector, submits the app with ``flwr run``,
scores what the roles report while the federation runs, writes the report, and stops every process
it started, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import tomli_w

import fedleak
from fedleak.certs import NodeCredentials, ServerTLS, probe_tls
from fedleak.errors import FedleakError
from fedleak.federation.collector import (
    ATTACKER_KINDS,
    HONEST_KINDS,
    SERVER_KINDS,
    Collector,
    Grant,
    Roster,
)
from fedleak.federation.console import Console
from fedleak.federation.processes import ProcessGroup, ensure_port_free, pick_ports, tail
from fedleak.federation.proxy import wait_https_healthy
from fedleak.federation.scoring import Scoring
from fedleak.federation.watchdog import start_watchdog, stop_watchdog
from fedleak.inbox import INBOX
from fedleak.reporting import TOKEN_ENV
from fedleak.runfolder import RunFolder, Status, open_run
from fedleak.settings import FederationSettings
from fedleak.settings.flower import node_config_arg, to_node_config, to_run_config

CONNECTION = "fedleak"
FINISHED = "finished"
ALL_KINDS = SERVER_KINDS | ATTACKER_KINDS


@dataclass(frozen=True)
class Remote:
    """Run against a SuperLink someone else started (``fedleak run --superlink``)."""

    superlink: str  # host:port of its one HTTP port (Fleet and Control API)
    collector_listen: str = "0.0.0.0:7070"  # where this process serves the collector
    collector_address: str = ""  # how the roles reach it; default: this host's name + port
    root_certificates: str = ""  # CA for the SuperLink's TLS ("" = insecure)
    token: str = ""  # the report token the roles were given (one shared token)
    control_cert: tuple[str, ...] = ()  # (cert, key) for a SuperLink behind the nginx proxy
    register_keys: str = ""  # a folder of SuperNode public keys to register (node auth)
    collector_tls: str = ""  # a `fedleak certs` folder: serve the collector with its services cert


def app_dir() -> Path:
    """The Flower App (this source tree): `flwr run` packs it into a FAB."""
    root = Path(fedleak.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists() or not (root / "server" / "app.py").exists():
        raise FedleakError(
            f"fedleak run needs the source tree (pip install -e .); not found at {root}"
        )
    return root


def flower_env(run: RunFolder) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)  # each process gets its own token, or none
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(
        FLWR_HOME=str(run.path / "flwr-home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        RAY_DEDUP_LOGS="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
    )
    return env


def preflight(settings: FederationSettings, remote: Remote | None) -> None:
    """Fail in one line, before any process starts or folder is written, on what we can check."""
    from fedleak.data import load_dataset

    data = settings.data
    for split in ("train", "test"):
        load_dataset(data.dataset, split, data.root or None, download=data.download)
    dep = settings.deployment
    if remote is None and dep.superlink_port:
        ensure_port_free(dep.superlink_port, "deployment.superlink-port")
    if remote is None and dep.node_ports and settings.run.engine == "deployment":
        pick_ports(dep.node_ports, settings.num_participants, "deployment.node-ports")


def write_connection(run: RunFolder, address: str, root_certificates: str = "") -> None:
    home = run.path / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    link: dict[str, object] = {"address": address}
    if root_certificates:
        link["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        link["insecure"] = True
    conf = {"superlink": {"default": CONNECTION, CONNECTION: link}}
    (home / "config.toml").write_text(tomli_w.dumps(conf))


def wait_healthy(procs: ProcessGroup, port: int, timeout: float = 60.0) -> None:
    superlink = procs.procs[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if superlink.popen.poll() is not None:
            raise FedleakError(
                f"flower-superlink exited (code {superlink.popen.returncode}): "
                f"{tail(superlink.log, 3) or 'see ' + str(superlink.log)}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise FedleakError(f"flower-superlink did not become healthy within {timeout:.0f} s")


def start_superlink(
    procs: ProcessGroup,
    port: int,
    log_dir: Path,
    simulation: bool,
    env: dict[str, str],
    tls: ServerTLS | None = None,
    node_auth: bool = False,
) -> None:
    """A SuperLink on localhost whose one port serves SuperNodes, the CLI and the ServerApp.
    With ``tls`` it serves HTTPS (its SuperExec dials 127.0.0.1, so the certificate must name
    it); ``node_auth`` admits only SuperNodes whose keys `flwr supernode register` added."""
    if node_auth and tls is None:
        raise FedleakError("SuperNode authentication needs TLS: give the SuperLink a certificate")
    if tls is None:
        security = ["--insecure"]
    else:
        tls.check(host="127.0.0.1")
        security = ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        security += ["--ssl-ca-certfile", str(tls.ca)]
    if node_auth:
        security.append("--enable-supernode-auth")
    cmd = [
        "flower-superlink",
        *security,
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if simulation:
        cmd.append("--simulation")
    proc = procs.start("superlink", cmd, log_dir / "superlink.log", env=env)
    if tls is None:
        wait_healthy(procs, port)
    else:
        wait_https_healthy(proc, f"https://127.0.0.1:{port}/health", tls.ca)


def start_supernode(
    procs: ProcessGroup,
    superlink_port: int,
    port: int,
    node_config: str,
    name: str,
    log: Path,
    env: dict[str, str],
    credentials: NodeCredentials | None = None,
    superlink_host: str = "127.0.0.1",
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> None:
    """A SuperNode; with ``credentials`` it speaks TLS (trusting ``credentials.ca``, or the
    system's CAs when None) and signs in with ``credentials.key``. Flower retries a SuperLink
    that does not answer without limit unless ``max_retries`` / ``max_wait_time`` bound it."""
    address = f"{superlink_host}:{superlink_port}"
    security = ["--insecure"]
    if credentials is not None:
        credentials.check()
        security = []
        if credentials.ca is not None:
            probe_tls(address, credentials.ca)  # a wrong CA fails here, naming the file
            security += ["--root-certificates", str(credentials.ca)]
        if credentials.key is not None:
            security += ["--auth-supernode-private-key", str(credentials.key)]
    retry = [] if max_retries is None else ["--max-retries", str(max_retries)]
    retry += [] if max_wait_time is None else ["--max-wait-time", str(max_wait_time)]
    cmd = ["flower-supernode", *security, "--superlink", address, "--port", str(port), *retry]
    procs.start(name, [*cmd, "--node-config", node_config], log, env=env)


def flwr(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout)


def submit(run: RunFolder, settings: FederationSettings, env: dict[str, str]) -> int:
    simulation = settings.run.engine == "simulation"
    run_config = run.path / "flwr-run-config.toml"
    flat = to_run_config(settings, include_participants=simulation)
    run_config.write_text(tomli_w.dumps(flat))
    args = ["run", str(app_dir()), CONNECTION, "--run-config", str(run_config), "--format", "json"]
    if simulation:
        sim = settings.simulation
        args += [
            "--federation-config",
            f"num_supernodes={settings.num_participants} "
            f"client_resources_num_cpus={sim.client_cpus} "
            f"init_args_num_cpus={sim.backend_cpus}",
        ]
    result = flwr(env, *args)
    try:
        reply = json.loads(result.stdout)
        return int(reply["run-id"])
    except (ValueError, KeyError, TypeError) as err:
        text = (result.stdout + result.stderr).strip().splitlines()
        raise FedleakError(f"flwr run failed: {' '.join(text[-3:]) or 'no output'}") from err


def run_status(env: dict[str, str], run_id: int) -> str:
    try:
        result = flwr(env, "ls", "--run-id", str(run_id), "--format", "json", timeout=60)
        runs = json.loads(result.stdout).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"
    except (ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


# --- tokens and processes ---------------------------------------------------------------------


def report_tokens(settings: FederationSettings) -> tuple[dict[str, Grant], dict[str, str]]:
    """(grants the collector accepts, token per process: "server" / "participant-<i>").

    On the Deployment Engine every process gets its own token, limited to its own source and
    the kinds its role sends. The Simulation Engine runs every role in one process tree with one
    environment, so one token speaks for all of them there."""
    if settings.run.engine == "simulation":
        token = secrets.token_hex(16)
        return {token: Grant(("server", "participant-*"), ALL_KINDS)}, {"server": token}
    grants, per_process = {}, {}
    server = secrets.token_hex(16)
    grants[server] = Grant(("server",), SERVER_KINDS)
    per_process["server"] = server
    for spec in settings.specs():
        token = secrets.token_hex(16)
        kinds = ATTACKER_KINDS if spec.is_attacker else HONEST_KINDS
        grants[token] = Grant((f"participant-{spec.index}",), kinds)
        per_process[f"participant-{spec.index}"] = token
    return grants, per_process


# --- one run ----------------------------------------------------------------------------------


def launch(
    settings: FederationSettings, console: Console | None = None, remote: Remote | None = None
) -> tuple[Path, Status]:
    """Run one experiment end to end; returns the report's path and the run's status."""
    preflight(settings, remote)
    console = console or Console(rounds=settings.run.rounds)
    name = (settings.preset or "run").removesuffix(".toml").split("/")[-1]
    result: dict[str, object] = {}

    def report(path: Path) -> None:
        from fedleak.report import write_report

        result["report"] = write_report(path)

    meta = {
        "preset": settings.preset,
        "seed": settings.run.seed,
        "engine": settings.run.engine,
        "remote": remote.superlink if remote else None,
    }
    with open_run(
        settings.run.out_dir,
        name,
        kind="federation",
        config=settings.to_toml_dict(),
        meta=meta,
        report=report,
    ) as (run, outcome):
        console.info(f"run folder {run.path}")
        outcome.status, outcome.message = _federate(settings, run, console, remote)
    status = Status(run.read_json("meta.json", {}).get("status", outcome.status))
    console.stop_rounds()
    from fedleak.report.federation import verdict_lines

    console.verdict([line for _, line in verdict_lines(run)] or ["no attack result was recorded"])
    console.done(status, outcome.message, str(result.get("report", run.path / "report.html")))
    return Path(str(result.get("report", run.path / "report.html"))), status


def _federate(
    settings: FederationSettings, run: RunFolder, console: Console, remote: Remote | None
) -> tuple[Status, str]:
    if remote is None:  # node-local folders (generator state, fallback inbox) under the run's
        node_root = str(run.path.resolve() / "participants")
        settings = _with_deployment(settings, node_root=node_root)
    grants, tokens = report_tokens(settings)
    roster = None
    if remote is not None:
        grants = {remote.token: Grant(("server", "participant-*"), ALL_KINDS)}
        specs = settings.specs()
        roster = Roster(
            [to_node_config(s, settings.attack) for s in specs], [s.role for s in specs]
        )
    scoring = Scoring(run, settings)
    procs = ProcessGroup(flower_env(run))
    # If this process is killed (SIGKILL, a crash), the watchdog stops what it started.
    watchdog = start_watchdog(procs.token, run.path, run.path / "logs" / "watchdog.log")
    status, message, run_id = Status.FAILED, "", None
    if remote is None:
        listen, address = "127.0.0.1:0", ""
    else:
        listen, address = remote.collector_listen, remote.collector_address
    host, _, port = listen.rpartition(":")
    try:
        tls = None
        if remote is not None:
            # Before the collector opens: nodes enroll through it, and a node whose key is not
            # registered yet would be refused by the SuperLink.
            _connect_remote(run, remote, procs, console)
            if remote.collector_tls:
                from fedleak.certs import SERVICES, Bundle

                tls = Bundle(Path(remote.collector_tls)).server(SERVICES)
        collector = Collector(
            run.path / INBOX, grants, host=host, port=int(port), tls=tls, roster=roster
        )
        with collector:
            address = (
                address or f"{'127.0.0.1' if remote is None else _hostname()}:{collector.port}"
            )
            settings = _with_deployment(settings, collector=address)
            console.info("preparing the ground truth (test set, evaluator, realism thresholds)")
            scoring.prepare(say=console.info)
            if remote is None:
                superlink = _start_local(settings, run, procs, tokens, console)
                write_connection(run, f"127.0.0.1:{superlink}")
            run.write_meta(
                processes={p.name: p.popen.pid for p in procs.procs},
                process_token=procs.token,
                collector=address,
            )
            run_id = submit(run, settings, procs.env)
            run.write_meta(flower_run_id=run_id)
            console.info(
                f"{settings.run.engine} run {run_id} submitted ({settings.num_participants} "
                f"participants, {settings.run.rounds} rounds); the server waits for every "
                f"SuperNode (up to run.startup-timeout = {settings.run.startup_timeout:.0f} s)"
            )
            console.start_rounds()
            status, message = _follow(run, settings, procs, run_id, scoring, console)
            for record in scoring.poll():
                console.record(record)
            for record in scoring.model_inversion():
                console.record(record)
            if collector.stats.refused:
                console.warn(
                    f"the collector refused {sum(collector.stats.refused.values())} record(s): "
                    f"{collector.stats.last_refusal}"
                )
    except KeyboardInterrupt:
        if run_id is not None:
            flwr(procs.env, "stop", str(run_id), timeout=30)
        raise
    except FedleakError as err:
        status, message = Status.FAILED, str(err)
    finally:
        if run_id is not None:
            save_server_log(run, procs.env, run_id)
        procs.stop()
        stop_watchdog(watchdog)
        shutil.rmtree(run.path / "flwr-home" / "local-superlink", ignore_errors=True)
    if status == Status.FAILED and (cause := known_cause(run.path / "logs" / "serverapp.log")):
        message = f"{message}; {cause}" if message else cause
    status, message, notes = scoring.verdict(status, message)
    for note in notes:
        console.warn(note)
    run.write_meta(notes=notes, participation=scoring.participation())
    return status, message


def _with_deployment(settings: FederationSettings, **values: str) -> FederationSettings:
    deployment = settings.deployment.model_copy(update=values)
    return settings.model_copy(update={"deployment": deployment})


def _connect_remote(run: RunFolder, remote: Remote, procs: ProcessGroup, console: Console) -> None:
    """The flwr CLI's connection to a SuperLink someone else started: directly, or through a
    local sidecar that presents the experimenter's client certificate to the SuperLink's proxy;
    then wait until it answers and register the SuperNodes' keys."""
    if remote.control_cert:
        from fedleak.federation.proxy import (
            ExperimenterSidecar,
            render_experimenter_sidecar,
            start_nginx,
            wait_listening,
        )

        if not remote.root_certificates:
            raise FedleakError("--control-cert needs --root-certificates (the proxy's CA)")
        port = pick_ports(0, 1, "the experimenter's sidecar")[0]
        cert, key = (Path(p) for p in remote.control_cert)
        sidecar = ExperimenterSidecar(
            f"127.0.0.1:{port}", remote.superlink, cert, key, Path(remote.root_certificates)
        )
        prefix = run.path / "sidecar"
        proc = start_nginx(procs, "sidecar", render_experimenter_sidecar(sidecar, prefix), prefix)
        wait_listening(proc, sidecar.listen)
        write_connection(run, sidecar.listen)
    else:
        write_connection(run, remote.superlink, remote.root_certificates)
    deadline, answer = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        answer = flwr(procs.env, "ls", "--format", "json", timeout=60)
        if _succeeded(answer):  # flwr ls exits 0 on a refusal too; its JSON says which
            break
        console.info(f"waiting for the SuperLink at {remote.superlink}")
        time.sleep(3)
    else:
        said = (answer.stdout + answer.stderr).strip().splitlines()[-1:] if answer else []
        raise FedleakError(
            f"the SuperLink at {remote.superlink} did not answer within 180 s: "
            f"{' '.join(said) or 'no reply'}"
        )
    for key in sorted(Path(remote.register_keys).glob("*.pub")) if remote.register_keys else []:
        result = flwr(procs.env, "supernode", "register", str(key), CONNECTION, timeout=60)
        if result.returncode != 0:
            text = (result.stdout + result.stderr).strip().splitlines()[-1:]
            raise FedleakError(f"cannot register {key}: {' '.join(text)}")
        console.info(f"registered SuperNode key {key.name}")


def _succeeded(result: subprocess.CompletedProcess) -> bool:
    try:
        return result.returncode == 0 and bool(json.loads(result.stdout).get("success"))
    except (ValueError, AttributeError):
        return False


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _start_local(
    settings: FederationSettings,
    run: RunFolder,
    procs: ProcessGroup,
    tokens: dict[str, str],
    console: Console,
) -> int:
    """Start the SuperLink (and the SuperNodes on the Deployment Engine); returns its port."""
    simulation = settings.run.engine == "simulation"
    port = pick_ports(settings.deployment.superlink_port, 1, "deployment.superlink-port")[0]
    logs = run.path / "logs"
    start_superlink(procs, port, logs, simulation, env={TOKEN_ENV: tokens["server"]})
    console.info(f"SuperLink listening on 127.0.0.1:{port}")
    if simulation:
        return port
    specs = settings.specs()
    node_ports = pick_ports(settings.deployment.node_ports, len(specs), "deployment.node-ports")
    for spec, node_port in zip(specs, node_ports, strict=True):
        node = node_config_arg(to_node_config(spec, settings.attack))
        start_supernode(
            procs,
            port,
            node_port,
            node,
            f"supernode {spec.index} ({spec.role})",
            logs / f"supernode-{spec.index}-{spec.role}.log",
            env={TOKEN_ENV: tokens[f"participant-{spec.index}"]},
        )
    console.info(f"{len(specs)} SuperNodes started")
    return port


def _follow(
    run: RunFolder,
    settings: FederationSettings,
    procs: ProcessGroup,
    run_id: int,
    scoring: Scoring,
    console: Console,
) -> tuple[Status, str]:
    started = time.monotonic()
    last_status_check = 0.0
    # The server reports every round; silence much longer than a round is a run that stalled
    # (a SuperLink restarted under its ServerApp, a network gone) and is failed, not awaited.
    run = settings.run
    stall_limit = run.startup_timeout + 2 * run.round_timeout
    last_heard = time.monotonic()
    while True:
        time.sleep(1.0)
        records = scoring.poll(budget=3.0)  # scoring must not keep the loop from its checks
        for record in records:
            console.record(record)
        if records or scoring.folder_changed():
            last_heard = time.monotonic()
        elif time.monotonic() - last_heard > stall_limit:
            flwr(procs.env, "stop", str(run_id), timeout=30)
            return (
                Status.FAILED,
                f"no record from the federation for {stall_limit:.0f} s "
                "(run.startup-timeout + 2 x run.round-timeout): it stalled",
            )
        for proc in procs.newly_exited():
            if proc.name == "superlink":
                return Status.FAILED, f"flower-superlink exited (code {proc.popen.returncode})"
            console.warn(
                f"{proc.name} exited (code {proc.popen.returncode}); its turns time out after "
                f"{settings.run.round_timeout:.0f} s and the run goes on with the others"
            )
        if scoring.health.server == "failed":
            return Status.FAILED, f"server: {scoring.health.server_message}"
        done = scoring.health.server == "finished"
        if done or time.monotonic() - last_status_check > 10:
            last_status_check = time.monotonic()
            flower = run_status(procs.env, run_id)
            if flower.startswith(FINISHED):
                if flower.endswith("completed"):
                    return Status.FINISHED, ""
                return (
                    Status.FAILED,
                    f"the ServerApp ended without finishing (Flower's run status: {flower}; "
                    "its log: logs/serverapp.log)",
                )
        if time.monotonic() - started > settings.run.max_wall_time:
            flwr(procs.env, "stop", str(run_id), timeout=30)
            return (
                Status.STOPPED,
                f"stopped after run.max-wall-time = {settings.run.max_wall_time:.0f} s",
            )


# Failures outside fedleak that Flower reports only deep in the ServerApp's log: (what the log
# says, what the user should read).
RAY_DID_NOT_START = (
    "Ray (Flower's Simulation Engine) did not start within its fixed time limits, which happens "
    'on an overloaded machine; run it again, or use run.engine = "deployment" (no Ray)'
)
KNOWN_CAUSES = (
    ("The current node timed out during startup", RAY_DID_NOT_START),  # the raylet, 30 s
    ("gcs_server_port", RAY_DID_NOT_START),  # "Timed out waiting for file .../gcs_server_port_…"
)


def known_cause(log: Path) -> str | None:
    """A one-line explanation of a known outside failure found in the ServerApp's log."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    return next((why for marker, why in KNOWN_CAUSES if marker in text), None)


def save_server_log(run: RunFolder, env: dict[str, str], run_id: int) -> None:
    try:
        result = flwr(env, "log", str(run_id), CONNECTION, "--show", timeout=60)
        (run.path / "logs" / "serverapp.log").write_text(result.stdout + result.stderr)
    except (subprocess.TimeoutExpired, OSError):
        pass
