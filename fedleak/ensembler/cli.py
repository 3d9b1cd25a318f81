"""``fedleak ensembler``: train the defenses, serve, classify, attack, or run a whole preset.

    fedleak ensembler run ensembler-cifar10-smoke [--set attack.shadow-epochs=2]
    fedleak ensembler train ensembler-cifar10 --defense ensembler --out bundles/
    fedleak ensembler serve --bundle bundles/ensembler/server.pt --port 50051 --record rec/
    fedleak ensembler classify ensembler-cifar10 --bundle bundles/ensembler/client.pt \\
        --server 127.0.0.1:50051
    fedleak ensembler attack ensembler-cifar10 --bundle bundles/ensembler/server.pt \\
        --recordings rec/ --out attack/
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from fedleak.clients import ensembler_tls
from fedleak.errors import FedleakError
from fedleak.server import ensembler_options


def _preset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="preset name (see `presets`) or a TOML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.epochs=2",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedleak ensembler",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="list the Ensembler presets")
    run = sub.add_parser("run", help="train, serve, classify, attack and report a preset")
    _preset_args(run)
    report = sub.add_parser("report", help="rebuild a run folder's report.html")
    report.add_argument("run_dir", type=Path)
    train = sub.add_parser("train", help="train (or reuse cached) bundles of some defenses")
    _preset_args(train)
    train.add_argument(
        "--defense",
        action="append",
        default=[],
        help="defense to train (repeatable; default: the preset's list)",
    )
    train.add_argument("--out", type=Path, help="also copy the bundles to OUT/<defense>/")
    serve = sub.add_parser("serve", help="serve a server bundle over gRPC (the service)")
    serve.add_argument("--bundle", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--record", metavar="DIR", help="keep every received feature batch")
    serve.add_argument("--threads", type=int, default=1)
    ensembler_options.add_arguments(serve)  # limits and TLS
    classify = sub.add_parser("classify", help="classify the preset's victim images remotely")
    _preset_args(classify)
    classify.add_argument("--bundle", required=True, type=Path, help="client bundle")
    classify.add_argument("--server", required=True, help="HOST:PORT")
    ensembler_tls.add_arguments(classify)
    attack = sub.add_parser("attack", help="invert features a server recorded")
    _preset_args(attack)
    attack.add_argument("--bundle", required=True, type=Path, help="server bundle")
    attack.add_argument("--recordings", required=True, type=Path, help="the server's --record DIR")
    attack.add_argument("--out", required=True, type=Path, help="where reconstructions go")
    attack.add_argument(
        "--score",
        action="store_true",
        help="score against the preset's victim images (the evaluator's view)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except FedleakError as err:
        print(f"fedleak ensembler: error: {err}", file=sys.stderr)
        return 2


def _cfg(args: argparse.Namespace) -> dict:
    import torch

    from fedleak.ensembler.config import load_preset

    cfg = load_preset(args.preset, args.overrides)
    torch.set_num_threads(cfg["threads"])
    return cfg


def _presets(args: argparse.Namespace) -> int:
    from fedleak.ensembler.config import load_preset, preset_names

    for name in preset_names():
        print(f"{name:<26} {load_preset(name)['description']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from fedleak.ensembler.experiment import run_preset

    folder = run_preset(_cfg(args))
    results = json.loads((folder / "results.json").read_text("utf-8"))
    for row in results["rows"]:
        print(
            f"{row['name']:<26} acc {row['accuracy']:.4f} ({row['accuracy_change']:+.2f}) "
            f"SSIM {row['ssim']:.4f} ± {row.get('ssim_std', 0.0):.4f} "
            f"PSNR {row['psnr']:.2f} ± {row.get('psnr_std', 0.0):.2f}"
        )
    print(folder / "report.html")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedleak.ensembler.report import write_report

    if not (args.run_dir / "config.json").is_file():
        raise FedleakError(f"{args.run_dir} is not a run folder (no config.json)")
    print(write_report(args.run_dir))
    return 0


def _train(args: argparse.Namespace) -> int:
    from fedleak.ensembler import baselines
    from fedleak.ensembler.data import load_splits
    from fedleak.ensembler.experiment import bundle_cache

    cfg = _cfg(args)
    defenses = args.defense or cfg["baselines"]["defenses"]
    if "shredder" in defenses and "none" not in defenses:
        defenses = ["none", *defenses]
    trained = baselines.build(defenses, load_splits(cfg).client, cfg, bundle_cache(cfg))
    for d, t in trained.items():
        server, client = t.server_path, t.client_path
        if args.out:
            (args.out / d).mkdir(parents=True, exist_ok=True)
            server = Path(shutil.copy2(server, args.out / d / "server.pt"))
            client = Path(shutil.copy2(client, args.out / d / "client.pt"))
        print(f"{d}: server {server} client {client}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fedleak.server.ensembler_service import main as service_main

    argv = [
        "--bundle",
        args.bundle,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--threads",
        str(args.threads),
    ]
    if args.record:
        argv += ["--record", args.record]
    return service_main(argv + ensembler_options.to_argv(args))


def _classify(args: argparse.Namespace) -> int:
    from fedleak.ensembler.data import load_splits
    from fedleak.ensembler.remote import classify_remote

    cfg = _cfg(args)
    victims = load_splits(cfg).victims
    try:
        logits = classify_remote(
            args.bundle,
            args.server,
            victims.images,
            batch_size=cfg["serve"]["batch-size"],
            timeout=cfg["serve"]["timeout"],
            tls=ensembler_tls.from_args(args),
        )
    except ValueError as err:  # unusable TLS files
        raise FedleakError(str(err)) from None
    correct = int((logits.argmax(1) == victims.labels).sum())
    print(f"accuracy {correct / len(victims):.4f} ({correct}/{len(victims)})")
    return 0


def _attack(args: argparse.Namespace) -> int:
    import torch

    from fedleak.attacker.ensembler_inversion import choose, fit_inverters, variants
    from fedleak.ensembler.data import load_splits
    from fedleak.ensembler.experiment import attack_settings, score
    from fedleak.ensembler.remote import received_features
    from fedleak.models.ensembler import load_server_bundle
    from fedleak.report.grids import save_image_grid
    from fedleak.server.ensembler_service import load_recordings

    cfg = _cfg(args)
    splits = load_splits(cfg)
    received = received_features(
        args.recordings, sum(len(f) for _, f in load_recordings(args.recordings))
    )
    nets = load_server_bundle(args.bundle).nets
    args.out.mkdir(parents=True, exist_ok=True)
    scores = {}
    for variant in variants(len(nets), cfg["attack"]["adaptive"]):
        inverters = fit_inverters(
            nets, variant, splits.aux.images, splits.aux.labels, attack_settings(cfg), received
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


_COMMANDS = {
    "presets": _presets,
    "run": _run,
    "report": _report,
    "train": _train,
    "serve": _serve,
    "classify": _classify,
    "attack": _attack,
}

if __name__ == "__main__":
    sys.exit(main())
