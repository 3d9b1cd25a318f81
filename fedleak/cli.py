"""The ``fedleak`` command line: one argparse tree for every command.

Names and settings are validated before torch is imported (``fedleak.settings`` needs none of
it), so a typo costs a fraction of a second. Exit codes: 0 finished (or stopped at its time
budget), 1 failed, 2 bad input, 3 degraded (completed, but not everything its results rest on
held), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from fedleak.clients import ensembler_tls  # flags only: no torch, no grpc at import
from fedleak.errors import FedleakError, Terminated
from fedleak.server import ensembler_options
from fedleak.settings import (
    dump_toml,
    load_ensembler,
    load_federation,
    preset_description,
    preset_names,
)

DEFAULT_PRESET = "demo"
EXIT = {"finished": 0, "stopped": 0, "failed": 1, "degraded": 3}


def _listing(kind: str) -> str:
    return ", ".join(preset_names(kind))  # names only: no preset is parsed for --help


def _sets(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a setting, e.g. --set {example} (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedleak",
        description="A networked federated-learning privacy testbed: attacks inside a real "
        "Flower federation, measured against ground truth.",
        epilog=f"federation presets: {_listing('federation')}\n"
        f"studies: {_listing('study')}\nensembler presets: {_listing('ensembler')}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a preset as a real federation and write a report",
        epilog=f"presets: {_listing('federation')}",
    )
    run.add_argument(
        "preset", nargs="?", default=DEFAULT_PRESET, help=f"preset or TOML file ({DEFAULT_PRESET})"
    )
    _sets(run, "run.rounds=10")
    out = run.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print warnings and the verdict only")
    out.add_argument("--json", action="store_true", help="one JSON event a line, for scripts")
    remote = run.add_argument_group(
        "remote SuperLink", "run against a SuperLink and SuperNodes started elsewhere"
    )
    remote.add_argument("--superlink", metavar="HOST:PORT", help="the SuperLink's address")
    remote.add_argument(
        "--collector-listen",
        default="0.0.0.0:7070",
        metavar="HOST:PORT",
        help="where to serve the results collector (default 0.0.0.0:7070)",
    )
    remote.add_argument(
        "--collector-address",
        default="",
        metavar="HOST:PORT",
        help="how the server and the attackers reach the collector (default: this host)",
    )
    remote.add_argument(
        "--root-certificates", default="", metavar="PEM", help="CA of the SuperLink's TLS"
    )
    remote.add_argument(
        "--control-cert",
        nargs=2,
        metavar=("CERT", "KEY"),
        help="client certificate for a SuperLink behind `fedleak superlink --proxy`: the Control "
        "API (flwr run/ls/stop) goes through a local nginx sidecar that presents it",
    )
    remote.add_argument(
        "--collector-tls",
        metavar="DIR",
        default="",
        help="serve the collector over TLS with DIR/services.crt and .key (a `fedleak certs` "
        "folder); the roles then need FEDLEAK_REPORT_CA",
    )
    remote.add_argument(
        "--register-keys",
        metavar="DIR",
        help="register every SuperNode public key (*.pub) in DIR before the run (node auth)",
    )

    show = sub.add_parser("config", help="print a preset's resolved settings as TOML")
    show.add_argument("preset", nargs="?", default=DEFAULT_PRESET)
    _sets(show, "run.rounds=10")
    sub.add_parser("presets", help="list the presets and studies")
    report = sub.add_parser("report", help="score what a run folder holds and rebuild its report")
    report.add_argument("run_dir", type=Path)
    report.add_argument(
        "--rescore", action="store_true", help="score every record again, not only new ones"
    )

    study = sub.add_parser(
        "study",
        help="run a single-process study (an attack or defense sweep) and write a report",
        epilog=f"studies: {_listing('study')}",
    )
    study.add_argument("name", nargs="?", help="study name (see --list)")
    study.add_argument("--list", action="store_true", help="list the studies")
    _sets(study, "attack.steps=100")
    study.add_argument("--out-dir", type=Path, default=Path("runs"), help="default: runs")

    _ensembler_parser(sub)
    _deployment_parsers(sub)
    from fedleak import certs

    certs.add_arguments(
        sub.add_parser(
            "certs",
            help="make a CA, server certificates, client certificates and SuperNode keys for TLS "
            "and node authentication (see deploy/SECURITY.md)",
        )
    )
    proxy = sub.add_parser(
        "proxy",
        help="render the nginx proxy that guards a SuperLink, or the experimenter's sidecar "
        "(`fedleak proxy superlink|sidecar --help`)",
        add_help=False,
    )
    proxy.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _ensembler_parser(sub: argparse._SubParsersAction) -> None:
    ens = sub.add_parser(
        "ensembler",
        help="Ensembler collaborative inference over gRPC: train, serve, classify, attack, run",
        epilog=f"presets: {_listing('ensembler')}",
    )
    cmds = ens.add_subparsers(dest="ensembler_command", required=True, metavar="COMMAND")
    cmds.add_parser("presets", help="list the Ensembler presets")

    def preset_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("preset", help="preset name (see `presets`) or a TOML file")
        _sets(p, "train.epochs=2")

    preset_args(cmds.add_parser("run", help="train, serve, classify, attack and report a preset"))
    rep = cmds.add_parser("report", help="rebuild a run folder's report.html")
    rep.add_argument("run_dir", type=Path)
    train = cmds.add_parser("train", help="train (or reuse cached) bundles of some defenses")
    preset_args(train)
    train.add_argument(
        "--defense", action="append", default=[], help="defense to train (default: the preset's)"
    )
    train.add_argument("--out", type=Path, help="also copy the bundles to OUT/<defense>/")
    serve = cmds.add_parser("serve", help="serve a server bundle over gRPC (the service)")
    serve.add_argument("--bundle", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--record", metavar="DIR", help="keep every received feature batch")
    serve.add_argument("--threads", type=int, default=1)
    ensembler_options.add_arguments(serve)  # the service's limits and TLS
    classify = cmds.add_parser("classify", help="classify the preset's victim images remotely")
    preset_args(classify)
    classify.add_argument("--bundle", required=True, type=Path, help="client bundle")
    classify.add_argument("--server", required=True, help="HOST:PORT")
    classify.add_argument(
        "--save-logits", type=Path, metavar="FILE", help="also save the logits (torch.save)"
    )
    ensembler_tls.add_arguments(classify)
    attack = cmds.add_parser("attack", help="invert features a server recorded")
    preset_args(attack)
    attack.add_argument("--bundle", required=True, type=Path, help="server bundle")
    attack.add_argument("--recordings", required=True, type=Path, help="the server's --record DIR")
    attack.add_argument("--out", required=True, type=Path, help="where reconstructions go")
    attack.add_argument(
        "--score", action="store_true", help="score against the preset's victim images"
    )


def _port(value: str) -> int:
    """A TCP port, refused by argparse with a one-line error outside 1-65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def _deployment_parsers(sub: argparse._SubParsersAction) -> None:
    link = sub.add_parser(
        "superlink",
        help="run a SuperLink with fedleak's defaults (for containers and many machines)",
    )
    link.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    link.add_argument("--port", type=_port, default=9093, help="its one port (9093)")
    link.add_argument("--tls", metavar="DIR", default="", help="a `fedleak certs` folder")
    link.add_argument("--node-auth", action="store_true", help="admit registered SuperNodes only")
    link.add_argument(
        "--proxy",
        action="store_true",
        help="guard the Control API: the SuperLink listens on loopback only and an nginx proxy "
        "on --host:--port requires the experimenter's client certificate for flwr commands",
    )
    link.add_argument("--database", default="", help="persist state here (survives a restart)")

    node = sub.add_parser(
        "node",
        help="run one participant's SuperNode against a SuperLink (containers, other machines)",
    )
    node.add_argument("preset", nargs="?", help="the preset this node belongs to")
    node.add_argument("--participant", type=int, default=-1, help="its index in the preset")
    _sets(node, "run.device=cuda")
    node.add_argument(
        "--enroll",
        metavar="HOST:PORT",
        help="ask the experimenter (`fedleak run --superlink`) who this node is instead",
    )
    node.add_argument("--role", choices=("honest", "attacker"), default="honest")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT")
    node.add_argument("--node-root", default="fedleak-node", help="this node's own folder")
    node.add_argument("--root-certificates", default="", metavar="PEM", help="CA for TLS")
    node.add_argument("--auth-key", default="", metavar="KEY", help="its node-auth private key")
    node.add_argument(
        "--auth-key-dir",
        default="",
        metavar="DIR",
        help="a folder of node keys (a `fedleak certs` nodes/ folder): use node-<participant>",
    )
    node.add_argument(
        "--runtime-port",
        type=_port,
        default=9094,
        help="the SuperNode's local Runtime API port (9094; each SuperNode on a host needs its "
        "own, and `fedleak superlink --proxy --port P` takes P+1)",
    )
    node.add_argument("--max-retries", type=int, help="give up after this many connection tries")
    node.add_argument("--max-wait-time", type=float, help="give up after this many seconds")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["proxy"]:  # its own command tree, options and all
        from fedleak.federation import proxy

        return proxy.main(argv[1:])
    args = _parser().parse_args(argv)
    command = args.command if args.command != "ensembler" else f"ensembler {args.ensembler_command}"
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[command](args)
    except FedleakError as err:
        print(f"fedleak: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("fedleak: stopped by SIGTERM", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("fedleak: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a run records its traceback in meta.json; one line here
        if os.environ.get("FEDLEAK_DEBUG"):
            raise
        print(
            f"fedleak: error: {type(err).__name__}: {err} (FEDLEAK_DEBUG=1 shows the traceback; "
            "a run folder's meta.json keeps it too)",
            file=sys.stderr,
        )
        return 1


def _terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


# --- federation ---------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    # Against a remote SuperLink the participants are real SuperNodes: the Deployment Engine.
    overrides = [*args.overrides, "run.engine=deployment"] if args.superlink else args.overrides
    settings = load_federation(args.preset, overrides)  # before any heavy import
    from fedleak.federation.console import Console
    from fedleak.federation.launcher import Remote, launch
    from fedleak.reporting import TOKEN_ENV

    mode = "json" if args.json else "quiet" if args.quiet else "text"
    console = Console(mode, rounds=settings.run.rounds)
    remote = None
    if args.superlink:
        token = os.environ.get(TOKEN_ENV, "")
        if not token:
            raise FedleakError(
                f"--superlink needs {TOKEN_ENV}: the report token given to the server and the "
                "attackers (they send their results to this process)"
            )
        remote = Remote(
            args.superlink,
            args.collector_listen,
            args.collector_address,
            args.root_certificates,
            token,
            tuple(args.control_cert or ()),
            args.register_keys or "",
            args.collector_tls,
        )
    _, status = launch(settings, console, remote)
    return EXIT[status]


def _config(args: argparse.Namespace) -> int:
    print(dump_toml(load_federation(args.preset, args.overrides)), end="")
    return 0


def _presets(args: argparse.Namespace) -> int:
    for kind, title in (
        ("federation", "presets"),
        ("study", "studies"),
        ("ensembler", "ensembler"),
    ):
        print(f"{title}:")
        for name in preset_names(kind):
            print(f"  {name:<26} {preset_description(kind, name)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedleak.report import write_report
    from fedleak.runfolder import META, RunFolder, reconcile

    folder = args.run_dir
    if not (folder / "config.json").is_file():
        raise FedleakError(f"{folder} is not a run folder (no config.json)")
    run = RunFolder(folder)
    if reconcile(run):
        print(f"fedleak: {folder}: its launcher is gone; marked failed (launcher lost)")
    if run.read_json(META, {}).get("kind", "federation") == "federation":
        _rescore(run, args.rescore)
    print(write_report(folder))
    return 0


def _rescore(run, everything: bool) -> None:
    """Score the inbox records not scored yet (all of them with ``everything``)."""
    from fedleak.federation.scoring import SCORED, Scoring
    from fedleak.runfolder import ATTACK, INVERSION, METRICS
    from fedleak.settings import FederationSettings

    settings = FederationSettings.model_validate(run.read_json("config.json"))
    if everything:
        for name in (SCORED, METRICS, ATTACK, INVERSION):
            run.file(name).unlink(missing_ok=True)
    scoring = Scoring(run, settings)
    scoring.poll()


# --- studies ----------------------------------------------------------------------------------


def _study(args: argparse.Namespace) -> int:
    if args.list:
        for name in preset_names("study"):
            print(f"{name:<20} {preset_description('study', name)}")
        return 0
    if not args.name:
        raise FedleakError("name a study (fedleak study --list shows them)")
    from fedleak.studies import run_study

    folder, status = run_study(args.name, args.overrides, args.out_dir)
    print(folder / "report.html")
    return EXIT[status]


# --- Ensembler --------------------------------------------------------------------------------


def _ensembler_settings(args: argparse.Namespace):
    settings = load_ensembler(args.preset, args.overrides)
    import torch

    torch.set_num_threads(settings.threads)
    return settings


def _ens_presets(args: argparse.Namespace) -> int:
    for name in preset_names("ensembler"):
        print(f"{name:<26} {preset_description('ensembler', name)}")
    return 0


def _ens_run(args: argparse.Namespace) -> int:
    import json

    settings = _ensembler_settings(args)
    from fedleak.ensembler.experiment import run_preset

    folder, status = run_preset(settings)
    results = json.loads((folder / "results.json").read_text("utf-8"))
    for row in results["rows"]:
        print(
            f"{row['name']:<26} acc {row['accuracy']:.4f} ({row['accuracy_change']:+.2f}) "
            f"SSIM {row['ssim']:.4f} ± {row.get('ssim_std', 0.0):.4f} "
            f"PSNR {row['psnr']:.2f} ± {row.get('psnr_std', 0.0):.2f}"
        )
    print(folder / "report.html")
    return EXIT[status]


def _ens_report(args: argparse.Namespace) -> int:
    if not (args.run_dir / "config.json").is_file():
        raise FedleakError(f"{args.run_dir} is not a run folder (no config.json)")
    from fedleak.report import write_report

    print(write_report(args.run_dir))
    return 0


def _ens_train(args: argparse.Namespace) -> int:
    settings = _ensembler_settings(args)
    from fedleak.ensembler import baselines
    from fedleak.ensembler.data import load_splits
    from fedleak.ensembler.experiment import bundle_cache

    defenses = args.defense or settings.baselines.defenses
    if "shredder" in defenses and "none" not in defenses:
        defenses = ["none", *defenses]
    trained = baselines.build(
        defenses, load_splits(settings).client, settings, bundle_cache(settings)
    )
    for d, t in trained.items():
        server, client = t.server_path, t.client_path
        if args.out:
            (args.out / d).mkdir(parents=True, exist_ok=True)
            server = Path(shutil.copy2(server, args.out / d / "server.pt"))
            client = Path(shutil.copy2(client, args.out / d / "client.pt"))
        print(f"{d}: server {server} client {client}")
    return 0


def _ens_serve(args: argparse.Namespace) -> int:
    from fedleak.server.ensembler_service import main as service_main

    argv = ["--bundle", args.bundle, "--host", args.host, "--port", str(args.port)]
    argv += ["--threads", str(args.threads)]
    if args.record:
        argv += ["--record", args.record]
    return service_main(argv + ensembler_options.to_argv(args))


def _ens_classify(args: argparse.Namespace) -> int:
    settings = _ensembler_settings(args)
    from fedleak.ensembler.data import load_splits
    from fedleak.ensembler.remote import classify_remote

    victims = load_splits(settings).victims
    try:
        logits = classify_remote(
            args.bundle,
            args.server,
            victims.images,
            batch_size=settings.serve.batch_size,
            timeout=settings.serve.timeout,
            tls=ensembler_tls.from_args(args),
        )
    except ValueError as err:  # unusable TLS files
        raise FedleakError(str(err)) from None
    correct = int((logits.argmax(1) == victims.labels).sum())
    print(f"accuracy {correct / len(victims):.4f} ({correct}/{len(victims)})")
    if args.save_logits:
        from fedleak.runfolder import atomic_torch_save

        print(atomic_torch_save(logits, args.save_logits))
    return 0


def _ens_attack(args: argparse.Namespace) -> int:
    import json

    settings = _ensembler_settings(args)
    import torch

    from fedleak.attacker.ensembler_inversion import choose, fit_inverters, variants
    from fedleak.ensembler.data import load_splits
    from fedleak.ensembler.experiment import attack_settings, score
    from fedleak.ensembler.remote import received_features
    from fedleak.models.ensembler import load_server_bundle
    from fedleak.report.grids import save_image_grid
    from fedleak.server.ensembler_service import load_recordings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    splits = load_splits(settings)
    received = received_features(
        args.recordings, sum(len(f) for _, f in load_recordings(args.recordings))
    )
    nets = load_server_bundle(args.bundle).nets
    args.out.mkdir(parents=True, exist_ok=True)
    scores = {}
    for variant in variants(len(nets), settings.attack.adaptive):
        inverters = fit_inverters(
            nets, variant, splits.aux.images, splits.aux.labels, attack_settings(settings), received
        )
        inverter, _ = choose(inverters, received)
        recon = inverter(received)
        torch.save(recon, args.out / f"{variant}.pt")
        save_image_grid(recon[:50], args.out / f"{variant}.png", nrow=10, scale=2)
        if args.score:
            if len(recon) != len(splits.victims):
                raise FedleakError(f"{len(recon)} recorded images, {len(splits.victims)} victims")
            scores[variant] = score(recon, splits.victims.images)
            print(
                f"{variant}: SSIM {scores[variant]['ssim']:.4f} PSNR {scores[variant]['psnr']:.2f}"
            )
    if scores:
        (args.out / "scores.json").write_text(json.dumps(scores, indent=2), "utf-8")
    print(args.out)
    return 0


def _superlink(args: argparse.Namespace) -> int:
    from fedleak.federation.deployment import run_foreground, superlink_command

    if not args.tls:
        print(
            "fedleak superlink: no TLS and no node authentication: whoever reaches port "
            f"{args.port} can join as a participant and run, list or stop runs "
            "(--tls DIR --node-auth --proxy closes that; deploy/SECURITY.md)",
            file=sys.stderr,
        )
    if not args.proxy:
        cmd = superlink_command(args.host, args.port, args.tls, args.node_auth, args.database)
        return run_foreground({"superlink": cmd})
    if not args.tls:
        raise FedleakError("--proxy needs --tls: the proxy presents the SuperLink's certificate")
    from fedleak.certs import Bundle, Manifest, ServerTLS
    from fedleak.federation.proxy import (
        SuperLinkProxy,
        nginx_binary,
        render_superlink_proxy,
        write_config,
    )

    inner = args.port + 1 if args.port < 65535 else args.port - 1
    link = superlink_command("127.0.0.1", inner, args.tls, args.node_auth, args.database)
    bundle = Bundle(Path(args.tls))
    proxy = SuperLinkProxy(
        listen=f"{args.host}:{args.port}",
        upstream=f"127.0.0.1:{inner}",
        tls=ServerTLS.from_bundle(bundle.root),
        control_clients=tuple(Manifest.load(bundle.root).clients),
    )
    prefix = Path(os.environ.get("HOME", ".")) / "fedleak-proxy"
    conf = write_config(render_superlink_proxy(proxy, prefix), prefix)
    nginx = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", "/dev/stderr"]
    return run_foreground({"superlink": link, "proxy": nginx})


def _node(args: argparse.Namespace) -> int:
    from fedleak.federation.deployment import (
        NodeIdentityFile,
        enroll,
        supernode_command,
        with_node_folders,
    )
    from fedleak.reporting import TOKEN_ENV
    from fedleak.settings.flower import to_node_config

    if args.enroll:
        token = os.environ.get(TOKEN_ENV, "")
        if not token:
            raise FedleakError(f"--enroll needs {TOKEN_ENV}, the report token of the experiment")
        folder = NodeIdentityFile(Path(args.node_root))
        nonce = folder.nonce()
        index, node = enroll(args.enroll, args.role, args.participant, token, nonce)
        folder.save(nonce, index, node)
    else:
        if not args.preset or args.participant < 0:
            raise FedleakError("name the preset and --participant I, or use --enroll HOST:PORT")
        settings = load_federation(args.preset, args.overrides)
        specs = settings.specs()
        if args.participant >= len(specs):
            raise FedleakError(f"{args.preset} has participants 0..{len(specs) - 1}")
        node = to_node_config(specs[args.participant], settings.attack)
    node = with_node_folders(node, str(Path(args.node_root).resolve()))
    print(f"fedleak node: participant {node['index']} ({node['role']})", flush=True)
    key = args.auth_key
    if args.auth_key_dir:
        key = str(Path(args.auth_key_dir) / f"node-{node['index']}")
    if key or args.root_certificates:
        from fedleak.certs import NodeCredentials, probe_tls

        ca = Path(args.root_certificates) if args.root_certificates else None
        # A missing, expired or foreign file fails here, naming it, not in Flower's retry loop.
        NodeCredentials(ca, Path(key) if key else None).check()
        if ca is not None:
            probe_tls(args.superlink, ca)  # a SuperLink not up yet is Flower's retry to wait for
    cmd = supernode_command(
        node,
        args.superlink,
        args.root_certificates,
        key,
        args.max_retries,
        args.max_wait_time,
        args.runtime_port,
    )
    from fedleak.federation.deployment import run_foreground

    code = run_foreground({"supernode": cmd})
    if code:  # Flower's own message does not name the address
        print(
            f"fedleak node: the SuperNode ended (code {code}) without a run to finish: "
            f"{args.superlink} refused it (node key not registered?) or could not be reached "
            "within --max-retries/--max-wait-time; its log is above",
            file=sys.stderr,
        )
    return code


def _certs(args: argparse.Namespace) -> int:
    from fedleak import certs

    return certs.run_cli(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "certs": _certs,
    "superlink": _superlink,
    "node": _node,
    "run": _run,
    "config": _config,
    "presets": _presets,
    "report": _report,
    "study": _study,
    "ensembler presets": _ens_presets,
    "ensembler run": _ens_run,
    "ensembler report": _ens_report,
    "ensembler train": _ens_train,
    "ensembler serve": _ens_serve,
    "ensembler classify": _ens_classify,
    "ensembler attack": _ens_attack,
}

if __name__ == "__main__":
    sys.exit(main())
