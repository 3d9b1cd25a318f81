"""`fedleak run`: a real federation of separate OS processes on this machine.

It starts a Flower SuperLink, one SuperNode per participant (Deployment Engine) or a simulation
SuperLink (Simulation Engine), submits the app with `flwr run`, follows progress, scores the
attack, writes the report, and stops every process it started, also on Ctrl-C or failure.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import tomli_w

import fedleak
from fedleak.certs import NodeCredentials, ServerTLS, probe_tls
from fedleak.config import participant_spec, to_node_config, to_run_config
from fedleak.data import load_dataset
from fedleak.errors import FedleakError
from fedleak.inversion_observer import InversionObserver
from fedleak.models import model_dataset
from fedleak.observer import AttackObserver
from fedleak.processes import ProcessGroup, ensure_port_free, pick_ports, tail
from fedleak.proxy import wait_https_healthy
from fedleak.runfolder import RunFolder, now_iso

CONNECTION = "fedleak"
FINISHED = "finished"


def app_dir() -> Path:
    """The Flower App (this checkout): `flwr run` packs it into a FAB."""
    root = Path(fedleak.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists() or not (root / "server" / "app.py").exists():
        raise FedleakError(
            f"fedleak run needs the source checkout (pip install -e .); not found at {root}"
        )
    return root


def flower_env(run: RunFolder) -> dict[str, str]:
    env = dict(os.environ)
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


def preflight(cfg: dict[str, Any]) -> None:
    """Fail in one line, before any process starts or folder is written, on what we can check."""
    data = cfg["data"]
    for split in ("train", "test"):
        load_dataset(data["dataset"], split, data["root"] or None, download=data["download"])
    if model_dataset(cfg["model"]["name"]) != data["dataset"]:
        raise FedleakError(
            f"model.name {cfg['model']['name']} is for "
            f"{model_dataset(cfg['model']['name'])}, not data.dataset {data['dataset']}"
        )
    dep = cfg["deployment"]
    if dep["superlink-port"]:
        ensure_port_free(dep["superlink-port"], "deployment.superlink-port")
    if dep["node-ports"] and cfg["run"]["engine"] == "deployment":
        pick_ports(dep["node-ports"], len(cfg["participants"]), "deployment.node-ports")


def prepare(cfg: dict[str, Any]) -> tuple[RunFolder, dict[str, Any]]:
    cfg = copy.deepcopy(cfg)
    run = RunFolder.create(
        cfg["run"]["out-dir"], cfg["preset"].removesuffix(".toml").split("/")[-1]
    )
    cfg["run"]["dir"] = str(run.path.resolve())
    for i, p in enumerate(cfg["participants"]):
        p.setdefault("out-dir", str(run.path.resolve() / "participants" / f"{i}-{p['role']}"))
        p.setdefault("state-dir", p["out-dir"] + "/state")
    run.write_json("config.json", cfg)
    run.write_meta(
        status="running",
        preset=cfg["preset"],
        seed=cfg["run"]["seed"],
        engine=cfg["run"]["engine"],
        started=now_iso(),
        versions=RunFolder.versions(),
        command=sys.argv,
    )
    return run, cfg


def write_connection(
    run: RunFolder, port: int, root_certificates: Path | None = None, host: str = "127.0.0.1"
) -> None:
    """The flwr CLI's connection: plain HTTP by default, TLS trusting `root_certificates`."""
    home = run.path / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, Any] = {"address": f"{host}:{port}"}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    conf = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
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
    tls: ServerTLS | None = None,
    node_auth: bool = False,
) -> None:
    """A SuperLink on localhost whose one port serves SuperNodes, the CLI and the ServerApp.
    With `tls` it serves HTTPS (its SuperExec dials 127.0.0.1, so the certificate must name
    it); `node_auth` admits only SuperNodes whose keys `flwr supernode register` added."""
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
    proc = procs.start(
        "superlink", cmd + (["--simulation"] if simulation else []), log_dir / "superlink.log"
    )
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
    credentials: NodeCredentials | None = None,
    superlink_host: str = "127.0.0.1",
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> None:
    """A SuperNode; with `credentials` it speaks TLS (trusting `credentials.ca`, or the system's
    CAs when None) and signs in with `credentials.key`. Flower retries a SuperLink that does not
    answer without limit unless `max_retries` / `max_wait_time` bound it."""
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
    procs.start(
        name,
        [
            "flower-supernode",
            *security,
            "--superlink",
            address,
            "--port",
            str(port),
            *retry,
            "--node-config",
            node_config,
        ],
        log,
    )


def flwr(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout)


def submit(run: RunFolder, cfg: dict[str, Any], env: dict[str, str]) -> int:
    simulation = cfg["run"]["engine"] == "simulation"
    run_config = run.path / "flwr-run-config.toml"
    run_config.write_text(tomli_w.dumps(to_run_config(cfg, include_participants=simulation)))
    args = ["run", str(app_dir()), CONNECTION, "--run-config", str(run_config), "--format", "json"]
    if simulation:
        sim = cfg["simulation"]
        args += [
            "--federation-config",
            f"num_supernodes={len(cfg['participants'])} "
            f"client_resources_num_cpus={int(sim['client-cpus'])} "
            f"init_args_num_cpus={int(sim['backend-cpus'])}",
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


class Observers:
    """Both attack families' scoring, polled together while the federation runs."""

    def __init__(self, run: RunFolder, cfg: dict[str, Any]) -> None:
        self.gan = AttackObserver(run, cfg)
        self.inversion = InversionObserver(run, cfg)

    def prepare(self) -> None:
        self.gan.prepare()

    def poll(self) -> list[dict]:
        return self.gan.poll() + self.inversion.poll()

    def model_inversion(self, model_path: Path) -> dict | None:
        return self.gan.model_inversion(model_path)


class Progress:
    """Prints new rounds and attack scores as they appear in the run folder."""

    def __init__(self, run: RunFolder, rounds: int, out=sys.stdout) -> None:
        self.run, self.rounds, self.out, self.seen = run, rounds, out, 0

    def show(self, attack: list[dict]) -> None:
        metrics = self.run.read_jsonl("metrics.jsonl")
        for rec in metrics[self.seen :]:
            if rec.get("round", 0) == 0:
                continue
            line = (
                f"round {rec['round']:>3}/{self.rounds}  test acc {rec['test_accuracy']:.3f}"
                f"  target->fake {rec.get('test_to_fake') or 0:.2f}  t={rec['time']:.0f}s"
            )
            if rec.get("participants", 1) == 0:
                line += "  (no reply this round)"
            print(line, file=self.out, flush=True)
        self.seen = len(metrics)
        for rec in attack:
            if rec.get("kind") == "inversion":
                self._show_inversion(rec)
                continue
            if "error" in rec:
                print(
                    f"  attack {rec['variant']} round {rec['round']}: {rec['error']}", file=self.out
                )
                continue
            print(
                f"  attack {rec['variant']:<7} round {rec['round']:>3}: target rate "
                f"{rec['target_rate']:.2f}, NN-L2 {rec['nn_l2_median']:.1f}, SSIM target/other "
                f"{rec['nn_ssim_target']:.2f}/{rec['nn_ssim_other']:.2f}, success "
                f"{'yes' if rec['success'] else 'no'}",
                file=self.out,
                flush=True,
            )

    def _show_inversion(self, rec: dict) -> None:
        who = (
            "adversarial client"
            if rec["threat"] == "client"
            else f"curious server (node {rec.get('node')})"
        )
        if "error" in rec:
            line = f"  inversion by {who}, round {rec['round']}: {rec['error']}"
        else:
            line = (
                f"  inversion by {who}, round {rec['round']}: PSNR {rec['psnr']:.1f} dB, "
                f"SSIM {rec['ssim']:.3f}, labels {rec['label_accuracy']:.0%}, "
                f"{rec.get('seconds', 0):.0f} s ({rec.get('attack')}, {rec.get('update')})"
            )
        print(line, file=self.out, flush=True)


def launch(cfg: dict[str, Any], out=sys.stdout) -> Path:
    """Run one experiment end to end; returns the report's path."""
    preflight(cfg)
    run, cfg = prepare(cfg)
    env = flower_env(run)
    engine = cfg["run"]["engine"]
    participants = cfg["participants"]
    print(f"fedleak: run folder {run.path}", file=out, flush=True)
    status, message, run_id = "failed", "", None
    procs = ProcessGroup(env)
    env = procs.env
    observer = Observers(run, cfg)
    progress = Progress(run, cfg["run"]["rounds"], out)
    try:
        observer.prepare()
        port = pick_ports(cfg["deployment"]["superlink-port"], 1, "deployment.superlink-port")[0]
        start_superlink(procs, port, run.path / "logs", simulation=engine == "simulation")
        if engine == "deployment":
            node_ports = pick_ports(
                cfg["deployment"]["node-ports"], len(participants), "deployment.node-ports"
            )
            for i, node_port in enumerate(node_ports):
                spec = participant_spec(cfg, i) | {"index": i}
                start_supernode(
                    procs,
                    port,
                    node_port,
                    to_node_config(spec),
                    f"supernode {i} ({spec['role']})",
                    run.path / "logs" / f"supernode-{i}-{spec['role']}.log",
                )
        write_connection(run, port)
        run.write_meta(
            processes={p.name: p.popen.pid for p in procs.procs}, process_token=procs.token
        )
        run_id = submit(run, cfg, env)
        run.write_meta(flower_run_id=run_id, superlink_port=port)
        print(
            f"fedleak: {engine} run {run_id} submitted ({len(participants)} participants, "
            f"{cfg['run']['rounds']} rounds)",
            file=out,
            flush=True,
        )
        status, message = follow(run, cfg, env, run_id, procs, observer, progress, out)
    except KeyboardInterrupt:
        status, message = "interrupted", "stopped by Ctrl-C"
        if run_id is not None:
            flwr(env, "stop", str(run_id), timeout=30)
    except FedleakError as err:
        status, message = "failed", str(err)
    finally:
        if run_id is not None:
            save_server_log(run, env, run_id)
        procs.stop()
    return finish(run, cfg, observer, progress, status, message, out)


def follow(
    run: RunFolder,
    cfg: dict[str, Any],
    env: dict[str, str],
    run_id: int,
    procs: ProcessGroup,
    observer: Observers,
    progress: Progress,
    out,
) -> tuple[str, str]:
    started = time.monotonic()
    last_status_check = 0.0
    while True:
        time.sleep(1.0)
        progress.show(observer.poll())
        for proc in procs.newly_exited():
            if proc.name == "superlink":
                return "failed", f"flower-superlink exited (code {proc.popen.returncode})"
            print(
                f"fedleak: warning: {proc.name} exited (code {proc.popen.returncode}); its "
                f"turns time out after {cfg['run']['round-timeout']:.0f} s and the run goes on "
                "with the others",
                file=out,
                flush=True,
            )
        meta = run.read_json("meta.json", {})
        if meta.get("server") == "failed":
            return "failed", f"server: {meta.get('server_error', 'failed')}"
        if time.monotonic() - last_status_check > 10 or meta.get("server") == "finished":
            last_status_check = time.monotonic()
            status = run_status(env, run_id)
            if status.startswith(FINISHED):
                ok = status.endswith("completed")
                return ("finished", "") if ok else ("failed", f"Flower run status {status}")
        if time.monotonic() - started > cfg["run"]["max-wall-time"]:
            flwr(env, "stop", str(run_id), timeout=30)
            return (
                "stopped",
                f"stopped after run.max-wall-time = {cfg['run']['max-wall-time']:.0f} s",
            )


def save_server_log(run: RunFolder, env: dict[str, str], run_id: int) -> None:
    try:
        result = flwr(env, "log", str(run_id), CONNECTION, "--show", timeout=60)
        (run.path / "logs" / "serverapp.log").write_text(result.stdout + result.stderr)
    except (subprocess.TimeoutExpired, OSError):
        pass


def finish(
    run: RunFolder,
    cfg: dict[str, Any],
    observer: Observers,
    progress: Progress,
    status: str,
    message: str,
    out,
) -> Path:
    from fedleak.report import write_report
    from fedleak.server.evaluation import FINAL_MODEL

    try:
        progress.show(observer.poll())
        if cfg["eval"]["model-inversion"] and any(
            p["role"] == "attacker" and p.get("mode") != "inversion" for p in cfg["participants"]
        ):
            progress.show([r for r in [observer.model_inversion(run.path / FINAL_MODEL)] if r])
    except KeyboardInterrupt:
        status, message = "interrupted", "stopped by Ctrl-C"
    run.write_meta(status=status, message=message, finished=now_iso())
    shutil.rmtree(run.path / "flwr-home" / "local-superlink", ignore_errors=True)
    report = write_report(run.path)
    print(f"fedleak: {status}{': ' + message if message else ''}", file=out, flush=True)
    print(f"fedleak: report {report}", file=out, flush=True)
    return report
