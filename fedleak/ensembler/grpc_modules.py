"""The generated gRPC modules, imported once with a clear error when they cannot be.

The package is ``proto`` (protoc writes ``from proto import ensembler_pb2``); the proto-plus
distribution also installs a top-level ``proto`` that would shadow it.
"""

from __future__ import annotations

try:
    from proto import ensembler_pb2 as pb
    from proto import ensembler_pb2_grpc as pb_grpc
    from proto import wire
except ImportError as err:
    raise ImportError(
        f"fedleak's gRPC modules (package `proto`) are not importable: {err}; reinstall fedleak "
        "(pip install -e .) and make sure the proto-plus distribution is not installed"
    ) from err

__all__ = ["pb", "pb_grpc", "wire"]
