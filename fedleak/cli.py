"""The `fedleak` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tomli_w

from fedleak.config import load_preset, preset_names
from fedleak.errors import FedleakError

DEFAULT_PRESET = "demo"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedleak", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a preset as a real federation and write a report")
    run.add_argument(
        "preset",
        nargs="?",
        default=DEFAULT_PRESET,
        help=f"preset name or path to a TOML file (default: {DEFAULT_PRESET})",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set run.rounds=10 --set run.engine=deployment",
    )
    show = sub.add_parser("config", help="print a preset's resolved configuration")
    show.add_argument("preset", nargs="?", default=DEFAULT_PRESET)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("presets", help="list the presets")
    report = sub.add_parser(
        "report", help="score a run folder's attack samples and rebuild its report"
    )
    report.add_argument("run_dir", type=Path)
    study = sub.add_parser(
        "study", help="run a single-process study (attack or defense sweep) and write a report"
    )
    study.add_argument("name", nargs="?", help="study name (see --list)")
    study.add_argument("--list", action="store_true", help="list the studies")
    study.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset key, e.g. --set attack.steps=100",
    )
    study.add_argument("--out-dir", type=Path, default=Path("runs"), help="default: runs")
    sub.add_parser(
        "ensembler",
        add_help=False,
        help="Ensembler collaborative inference over gRPC: train, serve, classify, attack, run "
        "(see `fedleak ensembler --help`)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ensembler"]:  # its own command tree, in the ensembler package
        from fedleak.ensembler.cli import main as ensembler_main

        return ensembler_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "presets":
            for name in preset_names():
                print(f"{name:<20} {load_preset(name).get('description', '')}")
            return 0
        if args.command == "config":
            cfg = load_preset(args.preset, args.overrides)
            print(tomli_w.dumps(cfg))
            return 0
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "study":
            return _study(args)
        from fedleak.launcher import launch

        cfg = load_preset(args.preset, args.overrides)
        report = launch(cfg)
        return 0 if _status(report.parent) in ("finished", "stopped") else 1
    except FedleakError as err:
        print(f"fedleak: error: {err}", file=sys.stderr)
        return 2


def _status(run_dir: Path) -> str:
    from fedleak.runfolder import RunFolder

    return str(RunFolder(run_dir).read_json("meta.json", {}).get("status", ""))


def _study(args: argparse.Namespace) -> int:
    from fedleak.studies import StudyFailed, run_study, study_description, study_names

    if args.list:
        for name in study_names():
            print(f"{name:<20} {study_description(name)}")
        return 0
    if not args.name:
        raise FedleakError("name a study (fedleak study --list shows them)")
    try:
        folder = run_study(args.name, args.overrides, args.out_dir)
    except StudyFailed as err:
        print(f"fedleak: error: {err}", file=sys.stderr)
        print(err.run_dir / "report.html")
        return 1
    except KeyboardInterrupt:  # run_study has recorded it in meta.json
        print("fedleak: study interrupted", file=sys.stderr)
        return 130
    print(folder / "report.html")
    return 0


def _report(run_dir: Path) -> int:
    from fedleak.observer import AttackObserver
    from fedleak.report import write_report
    from fedleak.runfolder import RunFolder

    if (run_dir / "results.json").is_file():  # a study folder, not a federated run
        from fedleak.studies.report import write_study_report

        print(write_study_report(run_dir))
        return 0
    if not (run_dir / "config.json").exists():
        raise FedleakError(f"{run_dir} is not a run folder (no config.json)")
    run = RunFolder(run_dir)
    AttackObserver(run, run.read_json("config.json")).poll()
    print(write_report(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
