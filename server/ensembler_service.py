"""The Ensembler server: N server nets behind gRPC (proto/ensembler.proto), plus health checks.

    python -m fedleak.server.ensembler_service --bundle server.pt [--port 0] [--record DIR]
        [--threads 1] [--idle-timeout 30] [--tls-cert cert.pem --tls-key key.pem]

prints ``fedleak-ensembler listening on HOST:PORT`` once it serves and stops cleanly on SIGTERM
or SIGINT. Every Forward request is checked chunk by chunk before any of it reaches the nets
(see ``ChunkValidator``); a bad one ends its own call with INVALID_ARGUMENT or
RESOURCE_EXHAUSTED and nothing else. The service runs on gRPC's asyncio server, so a client
that opens calls and sends nothing holds no thread: the server closes such calls after the idle
timeout, bounds the calls one address may hold open, and answers health checks meanwhile (see
``server/ensembler_options.py`` for the limits and TLS). The server is honest-but-curious by
construction: a ``recorder`` (``--record DIR``) keeps every feature batch it was sent, for the
attacks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
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
from fedleak.server.ensembler_guards import (
    RateLimitedLog,
    StreamSlots,
    Undecodable,
    add_lenient_service,
    peer_host,
)
from fedleak.server.ensembler_options import (
    ServerTLS,
    ServiceLimits,
    add_arguments,
    check_transport,
    limits_from_args,
    tls_from_args,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ensembler"].full_name
DEFAULT_MAX_BATCH = 1024
ACCEPTED_DTYPES = (pb.FLOAT32, pb.FLOAT16)
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEFAULT_LIMITS = ServiceLimits()
LOG_FLUSH_SECONDS = 5.0  # how soon the count of rate-limited log lines reaches the log

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
    """The service's handlers; they run on the event loop and never block it.

    Decoding payloads and running the nets happen on ``limits.workers`` threads, so a health
    check or a Describe is answered at once whatever the Forward calls do. A Forward call holds
    nothing while it waits for its client: idle calls cost a coroutine, not a thread, and the
    server ends them after ``limits.idle_timeout`` (and any call after
    ``limits.request_deadline``).
    """

    def __init__(
        self,
        runner: EnsembleRunner,
        input_shape: tuple[int, ...],
        version: str,
        *,
        max_message_bytes: int,
        max_batch: int,
        limits: ServiceLimits = DEFAULT_LIMITS,
        recorder: Recorder | None = None,
    ) -> None:
        self.runner = runner
        self.input_shape = tuple(input_shape)
        self.version = version
        self.max_message_bytes = max_message_bytes
        self.max_batch = max_batch
        self.limits = limits
        self.recorder = recorder
        self.pool = futures.ThreadPoolExecutor(limits.workers, thread_name_prefix="ensembler")
        self.slots = StreamSlots(limits.max_streams_per_address, limits.max_streams)
        self.rejections = RateLimitedLog(log, limits.log_burst, limits.log_rate)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.rejections.flush()

    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
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

    async def Forward(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        client = peer_host(context.peer())
        refusal = self.slots.acquire(client)
        if refusal is not None:
            await self._refuse(context, client, "?", RequestError(EXHAUSTED, refusal))
        validator = ChunkValidator(self.input_shape, self.max_batch, self.max_message_bytes)
        received: list[Tensor] = []
        error: RequestError | None = None
        try:
            async with asyncio.timeout(self.limits.request_deadline):
                await self._answer(context, validator, received)
        except RequestError as err:
            error = err
        except TimeoutError:
            error = RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the call took over {self.limits.request_deadline:g} s (--request-deadline)",
            )
        except Exception:
            self.rejections.log(logging.ERROR, "Forward failed", exc_info=True)
            error = RequestError(grpc.StatusCode.INTERNAL, "internal server error")
        finally:
            self.slots.release(client)
        request_id = validator.first.request_id if validator.first else "?"
        if error is not None:
            await self._refuse(context, client, request_id, error)  # raises: ends the call
        if self.recorder is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.pool, self._record, request_id, received)

    async def _answer(
        self, context: grpc.aio.ServicerContext, validator: ChunkValidator, received: list[Tensor]
    ) -> None:
        """Runs the nets chunk by chunk and streams their outputs back."""
        loop = asyncio.get_running_loop()
        answered = 0
        while (chunk := await self._next_chunk(context, validator)) is not grpc.aio.EOF:
            if isinstance(chunk, Undecodable):
                raise _invalid(f"chunk {validator.chunks}: {chunk}")
            features, replies = await loop.run_in_executor(
                self.pool, self._compute, validator, chunk, answered
            )
            if self.recorder is not None:
                received.append(features)
            for reply in replies:
                await context.write(reply)
            answered += len(replies)
        validator.finish()

    async def _next_chunk(
        self, context: grpc.aio.ServicerContext, validator: ChunkValidator
    ) -> pb.FeatureChunk | Undecodable | object:
        try:
            return await asyncio.wait_for(context.read(), self.limits.idle_timeout)
        except TimeoutError:
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"idle: no chunk within {self.limits.idle_timeout:g} s after chunk "
                f"{validator.chunks} (--idle-timeout)",
            ) from None

    def _compute(
        self, validator: ChunkValidator, chunk: pb.FeatureChunk, answered: int
    ) -> tuple[Tensor, list[pb.OutputChunk]]:
        """On a worker thread: check and decode one chunk, run the nets, encode the answers."""
        features = validator.accept(chunk)
        if validator.chunks == 1:
            self._check_response_fits(validator.response_limit)
        outputs = self.runner(features).cpu()
        offset = validator.samples - features.shape[0]
        replies = []
        runs = wire.split_batch(
            outputs.shape[1], self._output_sample_bytes(), validator.response_limit
        )
        for index, (start, stop) in enumerate(runs, start=answered):
            code, data = wire.encode(outputs[:, start:stop])
            replies.append(
                pb.OutputChunk(
                    request_id=chunk.request_id,
                    chunk_index=index,
                    batch_offset=offset + start,
                    shape=outputs[:, start:stop].shape,
                    dtype=code,
                    data=data,
                )
            )
        return features, replies

    def _record(self, request_id: str, received: list[Tensor]) -> None:
        try:
            self.recorder(request_id, torch.cat(received))
        except Exception:  # the recorder is the server's business, not the client's
            log.exception("recorder failed")

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        client: str,
        request_id: str,
        error: RequestError,
    ) -> None:
        self.rejections.log(
            logging.INFO,
            "rejected request %s from %s: %s: %s",
            request_id,
            client,
            error.code.name,
            error,
        )
        await context.abort(error.code, str(error))

    async def refuse_undecodable(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """A unary request that is no protobuf message (``ensembler_guards.lenient_service``)."""
        await self._refuse(context, peer_host(context.peer()), "?", _invalid(what))

    def _output_sample_bytes(self) -> int:
        return self.runner.num_nets * FEATURE_DIM * wire.itemsize(pb.FLOAT32)

    def _check_response_fits(self, limit: int) -> None:
        if self._output_sample_bytes() + wire.HEADER_ALLOWANCE > limit:
            raise RequestError(
                EXHAUSTED,
                f"one sample's outputs ({self._output_sample_bytes()} bytes) exceed the "
                f"response limit of {limit} bytes",
            )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class EnsemblerServer:
    """A started service. Its asyncio event loop runs on a thread of its own, which answers the
    health checks and never runs a net; ``stop`` ends it."""

    def __init__(
        self,
        servicer: EnsemblerServicer,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: ServerTLS | None = None,
    ) -> None:
        self.servicer = servicer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ensembler-loop", daemon=True
        )
        self._thread.start()
        try:
            self._credentials = _server_credentials(tls)
            self.port: int = self._call(self._start(_address(host, port)))
        except BaseException:
            self._close_loop()
            servicer.close()
            raise
        self._stopped = False

    def _call(self, coroutine: Coroutine) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _start(self, address: str) -> int:
        limits, limit = self.servicer.limits, self.servicer.max_message_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a busy port must fail, not be shared silently
                # A connection that never finishes its handshake is idle too.
                ("grpc.server_handshake_timeout_ms", int(1000 * limits.idle_timeout)),
            ]
        )
        self._health = health.aio.HealthServicer()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        refuse = self.servicer.refuse_undecodable
        add_lenient_service(
            self._server, pb_grpc.add_EnsemblerServicer_to_server, self.servicer, refuse
        )
        add_lenient_service(
            self._server, health_pb2_grpc.add_HealthServicer_to_server, self._health, refuse
        )
        try:
            if self._credentials is None:
                bound = self._server.add_insecure_port(address)
            else:
                bound = self._server.add_secure_port(address, self._credentials)
        except RuntimeError as err:
            bound, reason = 0, str(err).split(";")[0]
        else:
            reason = "gRPC could not bind"
        if bound == 0:
            await self._server.stop(None)
            raise OSError(f"cannot listen on {address}: {reason}")
        await self._server.start()
        self._housekeeping = asyncio.create_task(self._flush_log_regularly())
        return bound

    async def _flush_log_regularly(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_SECONDS)
            self.servicer.rejections.flush()

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, give running ones ``grace`` seconds, then end the loop."""
        if self._stopped:
            return
        self._stopped = True
        self._call(self._stop(grace))
        self._close_loop()

    async def _stop(self, grace: float | None) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        self._housekeeping.cancel()
        self.servicer.close()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> EnsemblerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(None)


def _server_credentials(tls: ServerTLS | None) -> grpc.ServerCredentials | None:
    if tls is None:
        return None
    key, chain, client_ca = tls.load()
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def serve(
    bundle_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    limits: ServiceLimits = DEFAULT_LIMITS,
    tls: ServerTLS | None = None,
    device: str = "auto",
    recorder: Recorder | None = None,
    runner_mode: Mode = "auto",
) -> EnsemblerServer:
    """Load the server bundle and start serving; ``port=0`` picks a free port (``.port``).

    ``limits``: see ``ServiceLimits``; ``tls``: plain text when None. ``runner_mode``: see
    ``EnsembleRunner``.
    """
    if max_message_bytes <= wire.HEADER_ALLOWANCE or max_batch < 1:
        raise ValueError("max_message_bytes and max_batch must be positive")
    bundle = load_server_bundle(bundle_path)
    runner = EnsembleRunner(bundle.nets, device, mode=runner_mode)
    servicer = EnsemblerServicer(
        runner,
        bundle.input_shape,
        bundle.version,
        max_message_bytes=max_message_bytes,
        max_batch=max_batch,
        limits=limits,
        recorder=recorder,
    )
    server = EnsemblerServer(servicer, host, port, tls=tls)
    log.info(
        "serving %d nets (%s, %s) on port %d with %s",
        runner.num_nets,
        runner.mode,
        runner.device,
        server.port,
        "plain text"
        if tls is None
        else "TLS" + (" and client certificates" if tls.client_ca else ""),
    )
    return server


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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--runner-mode", choices=("auto", "vmap", "loop"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to finish calls on stop")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port {args.port} is not in 0..65535")
        limits, tls = limits_from_args(args), tls_from_args(args)
        if tls is not None:
            tls.load()  # bad files: an error before the bundle is loaded
        check_transport(args.host, tls, args.insecure)
        recorder = DirectoryRecorder(args.record) if args.record else None
        server = serve(
            args.bundle,
            args.host,
            args.port,
            max_message_bytes=args.max_message_bytes,
            max_batch=args.max_batch,
            limits=limits,
            tls=tls,
            device=args.device,
            recorder=recorder,
            runner_mode=args.runner_mode,
        )
    except (BundleError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()  # handlers only now: a refused start leaves the caller's alone
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.port_file:
        atomic_write_bytes(args.port_file, f"{server.port}\n".encode())
    print(f"fedleak-ensembler listening on {_address(args.host, server.port)}", flush=True)
    while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        pass
    log.info("stopping")
    server.stop(args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
