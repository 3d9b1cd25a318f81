"""Regenerate the committed gRPC modules from the ``.proto`` files in this folder.

    python -m fedleak.proto.generate            # rewrites proto/*_pb2*.py
    python -m fedleak.proto.generate --out DIR  # writes DIR/fedleak/proto/*_pb2*.py instead

protoc names the generated imports after the .proto's path, so every file is staged as
``fedleak/proto/<name>.proto``: the modules then import ``from fedleak.proto import ...``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = Path("fedleak") / "proto"


def proto_files() -> list[Path]:
    return sorted(HERE.glob("*.proto"))


def generate(out: Path) -> Path:
    """Run protoc on every .proto here; returns the folder holding the generated modules."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / PACKAGE
        staged.mkdir(parents=True)
        names = []
        for proto in proto_files():
            shutil.copy2(proto, staged / proto.name)
            names.append(str(PACKAGE / proto.name))
        args = ["protoc", f"-I{staging}", f"--python_out={out}", f"--grpc_python_out={out}"]
        if protoc.main([*args, *names]) != 0:
            raise RuntimeError("protoc failed")
    return out / PACKAGE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedleak.proto.generate", description=__doc__)
    parser.add_argument("--out", type=Path, help="write here instead of over the committed files")
    args = parser.parse_args(argv)
    if args.out:
        print(generate(args.out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for module in generate(Path(tmp)).glob("*_pb2*.py"):
            shutil.copy2(module, HERE / module.name)
            print(HERE / module.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
