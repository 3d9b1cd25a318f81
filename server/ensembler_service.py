"""The Ensembler server: N server nets behind gRPC (proto/ensembler.proto), plus health checks.

    python -m fedleak.server.ensembler_service --bundle server.pt [--port 0] [--record DIR]
        [--threads 1]

prints ``fedleak-ensembler listening on HOST:PORT`` once it serves and stops cleanly on SIGTERM
or SIGINT. Every Forward request is checked chunk by chunk before any of it reaches the nets
(see ``ChunkValidator``); a bad one ends its own call with INVALID_ARGUMENT or
RESOURCE_EXHAUSTED and nothing else. The server is honest-but-curious by construction: a
``recorder`` (``--record DIR``) keeps every feature batch it was sent, for the attacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from torch import Tensor

from fedleak.models.ensembler import FEATURE_DIM, BundleError, load_server_bundle
from fedleak.proto import ensembler_pb2 as pb
from fedleak.proto import ensembler_pb2_grpc as pb_grpc
from fedleak.proto import wire
from fedleak.runfolder import atomic_torch_save, atomic_write_bytes, now_iso
from fedleak.server.ensemble_runner import EnsembleRunner, Mode

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ensembler"].full_name
DEFAULT_MAX_BATCH = 1024
ACCEPTED_DTYPES = (pb.FLOAT32, pb.FLOAT16)

Recorder = Callable[[str, Tensor], None]
log = logging.getLogger("fedleak.ensembler.server")


class RequestError(Exception):
    """A request the server refuses; ends that call with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


class ChunkValidator:
    """Checks the chunks of one Forward request in order; ``accept`` returns a chunk's features.

    Cheap checks (ids, counters, shape, byte length) run before the payload is decoded, and the
    payload is decoded only to reject NaN/inf, so a hostile client costs the server little.
    """

    def __init__(self, input_shape: tuple[int, ...], max_batch: int, max_message_bytes: int):
        self.input_shape = tuple(input_shape)
        self.max_batch = max_batch
        self.max_message_bytes = max_message_bytes
        self.first: pb.FeatureChunk | None = None
        self.chunks = 0
        self.samples = 0
        self.response_limit = max_message_bytes

    def accept(self, chunk: pb.FeatureChunk) -> Tensor:
        self._check_header(chunk)
        shape = tuple(chunk.shape)
        if len(shape) != 1 + len(self.input_shape) or shape[1:] != self.input_shape:
            raise _invalid(
                f"chunk {chunk.chunk_index}: shape {list(shape)} is not "
                f"[samples, {', '.join(map(str, self.input_shape))}]"
            )
        if shape[0] < 1 or self.samples + shape[0] > chunk.batch_size:
            raise _invalid(
                f"chunk {chunk.chunk_index}: {shape[0]} samples after {self.samples} do not fit "
                f"batch_size {chunk.batch_size}"
            )
        expected = wire.payload_bytes(shape, chunk.dtype)
        if len(chunk.data) != expected:
            raise _invalid(
                f"chunk {chunk.chunk_index}: payload is {len(chunk.data)} bytes, shape "
                f"{list(shape)} of {wire.dtype_name(chunk.dtype)} needs {expected}"
            )
        features = wire.decode(chunk.data, shape, chunk.dtype)
        if not torch.isfinite(features).all():
            raise _invalid(f"chunk {chunk.chunk_index}: features contain NaN or infinity")
        self.chunks += 1
        self.samples += shape[0]
        return features

    def _check_header(self, chunk: pb.FeatureChunk) -> None:
        if not chunk.request_id:
            raise _invalid("request_id is missing")
        if not wire.REQUEST_ID.fullmatch(chunk.request_id):
            raise _invalid("request_id must match [A-Za-z0-9_.-]{1,128} and not start with '.'")
        if self.first is None:
            self._check_first(chunk)
            self.first = chunk
        else:
            for name in ("request_id", "chunk_count", "batch_size", "dtype", "max_response_bytes"):
                if getattr(chunk, name) != getattr(self.first, name):
                    raise _invalid(
                        f"chunk {chunk.chunk_index}: {name} {getattr(chunk, name)!r} differs "
                        f"from the first chunk's {getattr(self.first, name)!r}"
                    )
        if chunk.chunk_index != self.chunks:
            raise _invalid(
                f"chunk_index {chunk.chunk_index} where {self.chunks} was expected "
                "(chunks must arrive in order, without gaps or repeats)"
            )
        if chunk.chunk_index >= chunk.chunk_count:
            raise _invalid(f"chunk_index {chunk.chunk_index} is beyond chunk_count")

    def _check_first(self, chunk: pb.FeatureChunk) -> None:
        if chunk.dtype not in ACCEPTED_DTYPES:
            accepted = ", ".join(wire.dtype_name(d) for d in ACCEPTED_DTYPES)
            raise _invalid(f"dtype {wire.dtype_name(chunk.dtype)} is not accepted ({accepted})")
        if not 1 <= chunk.batch_size <= self.max_batch:
            raise _invalid(f"batch_size {chunk.batch_size} is not in 1..{self.max_batch}")
        if not 1 <= chunk.chunk_count <= chunk.batch_size:
            raise _invalid(f"chunk_count {chunk.chunk_count} is not in 1..batch_size")
        if chunk.max_response_bytes:
            self.response_limit = min(self.max_message_bytes, chunk.max_response_bytes)

    def finish(self) -> None:
        """After the client's last chunk: the request must be complete."""
        if self.first is None:
            raise _invalid("empty request: no chunks were sent")
        if self.chunks != self.first.chunk_count or self.samples != self.first.batch_size:
            raise _invalid(
                f"incomplete request: {self.chunks} of {self.first.chunk_count} chunks, "
                f"{self.samples} of {self.first.batch_size} samples"
            )


class EnsemblerServicer(pb_grpc.EnsemblerServicer):
    def __init__(
        self,
        runner: EnsembleRunner,
        input_shape: tuple[int, ...],
        version: str,
        *,
        max_message_bytes: int,
        max_batch: int,
        recorder: Recorder | None = None,
    ) -> None:
        self.runner = runner
        self.input_shape = tuple(input_shape)
        self.version = version
        self.max_message_bytes = max_message_bytes
        self.max_batch = max_batch
        self.recorder = recorder

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        return pb.ServerInfo(
            num_nets=self.runner.num_nets,
            input_shape=self.input_shape,
            input_dtypes=ACCEPTED_DTYPES,
            model_version=self.version,
            max_message_bytes=self.max_message_bytes,
            max_batch=self.max_batch,
            feature_dim=FEATURE_DIM,
            output_dtype=pb.FLOAT32,
        )

    def Forward(
        self, request_iterator: Iterator[pb.FeatureChunk], context: grpc.ServicerContext
    ) -> Iterator[pb.OutputChunk]:
        validator = ChunkValidator(self.input_shape, self.max_batch, self.max_message_bytes)
        received: list[Tensor] = []
        error: RequestError | None = None
        completed = False
        try:
            completed = yield from self._answer(request_iterator, context, validator, received)
        except RequestError as err:
            error = err
        except grpc.RpcError:
            return  # the client cancelled or its deadline passed: nobody is listening
        except Exception:
            log.exception("Forward failed")
            error = RequestError(grpc.StatusCode.INTERNAL, "internal server error")
        if error is not None:
            request_id = validator.first.request_id if validator.first else "?"
            log.info("rejected request %s: %s: %s", request_id, error.code.name, error)
            context.abort(error.code, str(error))  # raises: must stay outside the try above
        if completed and self.recorder is not None:
            try:
                self.recorder(validator.first.request_id, torch.cat(received))
            except Exception:  # the recorder is the server's business, not the client's
                log.exception("recorder failed")

    def _answer(
        self,
        request_iterator: Iterator[pb.FeatureChunk],
        context: grpc.ServicerContext,
        validator: ChunkValidator,
        received: list[Tensor],
    ) -> Generator[pb.OutputChunk, None, bool]:
        """Runs the nets chunk by chunk; returns whether the request arrived complete."""
        out_index = 0
        for chunk in request_iterator:
            features = validator.accept(chunk)
            if validator.chunks == 1:
                self._check_response_fits(validator.response_limit)
            if self.recorder is not None:
                received.append(features)
            if not context.is_active():  # cancelled or past its deadline: skip the nets
                return False
            outputs = self.runner(features).cpu()
            offset = validator.samples - features.shape[0]
            for start, stop in wire.split_batch(
                outputs.shape[1], self._output_sample_bytes(), validator.response_limit
            ):
                piece = outputs[:, start:stop]
                code, data = wire.encode(piece)
                yield pb.OutputChunk(
                    request_id=chunk.request_id,
                    chunk_index=out_index,
                    batch_offset=offset + start,
                    shape=piece.shape,
                    dtype=code,
                    data=data,
                )
                out_index += 1
        validator.finish()
        return True

    def _output_sample_bytes(self) -> int:
        return self.runner.num_nets * FEATURE_DIM * wire.itemsize(pb.FLOAT32)

    def _check_response_fits(self, limit: int) -> None:
        if self._output_sample_bytes() + wire.HEADER_ALLOWANCE > limit:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"one sample's outputs ({self._output_sample_bytes()} bytes) exceed the "
                f"response limit of {limit} bytes",
            )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def serve(
    bundle_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    workers: int = 8,
    device: str = "auto",
    recorder: Recorder | None = None,
    max_concurrent_rpcs: int | None = None,
    runner_mode: Mode = "auto",
) -> tuple[grpc.Server, int]:
    """Load the server bundle and start serving; returns the started server and its port.

    ``port=0`` picks a free port. RPCs beyond ``max_concurrent_rpcs`` (default 8 x workers)
    are refused with RESOURCE_EXHAUSTED instead of queueing without bound. ``runner_mode``:
    see ``EnsembleRunner``.
    """
    if max_message_bytes <= wire.HEADER_ALLOWANCE or max_batch < 1 or workers < 1:
        raise ValueError("max_message_bytes, max_batch and workers must be positive")
    bundle = load_server_bundle(bundle_path)
    runner = EnsembleRunner(bundle.nets, device, mode=runner_mode)
    servicer = EnsemblerServicer(
        runner,
        bundle.input_shape,
        bundle.version,
        max_message_bytes=max_message_bytes,
        max_batch=max_batch,
        recorder=recorder,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ensembler"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a busy port must fail, not be shared silently
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs or 8 * workers,
    )
    pb_grpc.add_EnsemblerServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(_address(host, port))
    except RuntimeError as err:
        raise OSError(f"cannot listen on {_address(host, port)}: {err}") from err
    if bound == 0:
        raise OSError(f"cannot listen on {_address(host, port)}")
    server.start()
    log.info(
        "serving %d nets (%s, %s) on port %d", runner.num_nets, runner.mode, runner.device, bound
    )
    return server, bound


class DirectoryRecorder:
    """``--record DIR``: one ``NNNNNN-<request_id>.pt`` per request, written atomically.

    Each file holds ``{"request_id", "features", "received"}``; the running number keeps the
    arrival order and keeps a repeated request id from overwriting an earlier file.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._next = 1 + max((_sequence(p) for p in self.directory.glob("*.pt")), default=0)

    def __call__(self, request_id: str, features: Tensor) -> None:
        with self._lock:
            number, self._next = self._next, self._next + 1
        atomic_torch_save(
            {"request_id": request_id, "features": features, "received": now_iso()},
            self.directory / f"{number:06d}-{request_id}.pt",
        )


def _sequence(path: Path) -> int:
    head = path.name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def load_recordings(directory: str | os.PathLike) -> list[tuple[str, Tensor]]:
    """(request_id, features) of every request a ``DirectoryRecorder`` kept, in arrival order."""
    paths = sorted(Path(directory).glob("*.pt"), key=_sequence)
    records = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    return [(r["request_id"], r["features"]) for r in records]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedleak.server.ensembler_service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", required=True, help="server bundle (save_server_bundle)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--port-file", help="also write the bound port to this file")
    p.add_argument("--record", metavar="DIR", help="keep every request's features in DIR")
    p.add_argument("--max-message-bytes", type=int, default=wire.DEFAULT_MAX_MESSAGE_BYTES)
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    p.add_argument("--workers", type=int, default=8, help="gRPC handler threads")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--runner-mode", choices=("auto", "vmap", "loop"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to finish calls on stop")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    recorder = DirectoryRecorder(args.record) if args.record else None
    try:
        server, port = serve(
            args.bundle,
            args.host,
            args.port,
            max_message_bytes=args.max_message_bytes,
            max_batch=args.max_batch,
            workers=args.workers,
            device=args.device,
            recorder=recorder,
            runner_mode=args.runner_mode,
        )
    except (BundleError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.port_file:
        atomic_write_bytes(args.port_file, f"{port}\n".encode())
    print(f"fedleak-ensembler listening on {_address(args.host, port)}", flush=True)
    while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        pass
    log.info("stopping")
    server.stop(args.grace).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
