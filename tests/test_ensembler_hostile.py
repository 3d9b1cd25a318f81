"""Hostile clients against a real Ensembler server process: idle streams, one address holding
many, a request that never finishes, and bytes that are no protobuf message. The service must
answer everyone else meanwhile, close what a hostile client holds, survive, and keep its log
short."""

from __future__ import annotations

import re
import socket
import threading
import time

import ensembler_helpers as helpers
import grpc
import pytest
import torch
from ensembler_helpers import SHAPE, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedleak.clients.ensembler_client import RemoteEnsemble
from fedleak.proto import ensembler_pb2 as pb
from fedleak.proto import ensembler_pb2_grpc as pb_grpc
from fedleak.proto import wire
from fedleak.server.ensembler_service import SERVICE_NAME

bundles, reference = helpers.bundles, helpers.reference  # fixtures, used here by name
pytestmark = pytest.mark.integration

IDLE = 5.0  # the server's --idle-timeout
DEADLINE = 8.0  # its --request-deadline
PER_ADDRESS = 10  # its --max-streams-per-address: eight idle streams and a client fit
SERVING = health_pb2.HealthCheckResponse.SERVING
FORWARD = "/fedleak.ensembler.v1.Ensembler/Forward"


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    limits = ["--idle-timeout", str(IDLE), "--request-deadline", str(DEADLINE)]
    limits += ["--max-streams-per-address", str(PER_ADDRESS), "--workers", "2"]
    proc = ServerProcess(tmp_path_factory.mktemp("server"), bundles[0], *limits)
    yield proc
    proc.stop_and_check()


class IdleStream:
    """A Forward call that opens and never sends; records how and when the server ended it."""

    def __init__(self, stub: pb_grpc.EnsemblerStub) -> None:
        self.release = threading.Event()  # ends the request generator when the test is done
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.ended = 0.0

        def nothing():
            self.release.wait()
            yield from ()

        self.opened = time.monotonic()
        self.call = stub.Forward(nothing(), timeout=120)
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        try:
            for _ in self.call:
                pass
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            self.code, self.details = err.code(), err.details()
        self.ended = time.monotonic()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        self.release.set()


def health(address: str, timeout: float = 2.0) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
    return reply.status


def forward_error(call) -> tuple[grpc.StatusCode, str]:
    try:
        for _ in call:
            pass
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def one_chunk(samples: int = 1, **fields) -> pb.FeatureChunk:
    data = wire.encode(torch.randn(samples, *SHAPE))[1]
    base = dict(request_id="slow", chunk_count=1, batch_size=samples, dtype=pb.FLOAT32)
    return pb.FeatureChunk(**{**base, "shape": [samples, *SHAPE], "data": data, **fields})


def assert_closed_as_idle(streams: list[IdleStream]) -> None:
    for s in streams:
        s.join(IDLE + 15)
    for s in streams:
        assert s.code == grpc.StatusCode.DEADLINE_EXCEEDED and "--idle-timeout" in s.details
        assert IDLE - 0.5 <= s.ended - s.opened <= IDLE + 5, s.ended - s.opened


def test_eight_idle_streams_do_not_starve_the_service(server, reference):
    with grpc.insecure_channel(server.address) as channel:
        idle = [IdleStream(pb_grpc.EnsemblerStub(channel)) for _ in range(8)]
        time.sleep(0.5)  # on loopback the server has all eight by now
        x = torch.randn(2, *SHAPE)
        assert health(server.address) == SERVING
        with RemoteEnsemble(server.address, timeout=IDLE) as remote:
            assert remote.describe()["num_nets"] == 2
            torch.testing.assert_close(remote.forward(x), reference(x), rtol=1e-4, atol=1e-4)
        assert [s.code for s in idle] == [None] * 8, "answered while all eight were open"
        assert_closed_as_idle(idle)
    assert server.proc.poll() is None
    assert health(server.address) == SERVING


def test_one_address_holds_a_bounded_number_of_streams(server, reference):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnsemblerStub(channel)
        idle = [IdleStream(stub) for _ in range(PER_ADDRESS)]
        time.sleep(0.5)
        started = time.monotonic()
        code, details = forward_error(stub.Forward(iter([one_chunk()]), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "--max-streams-per-address" in details
        assert time.monotonic() - started < 2, "refused at once, not queued"
        assert health(server.address) == SERVING
        assert_closed_as_idle(idle)
    x = torch.randn(1, *SHAPE)
    with RemoteEnsemble(server.address) as remote:  # the slots are free again
        torch.testing.assert_close(remote.forward(x), reference(x), rtol=1e-4, atol=1e-4)


def test_a_request_that_trickles_in_ends_at_the_request_deadline(server):
    """Each chunk within the idle timeout, the whole far beyond the request deadline."""
    count, gap = 4, 0.6 * IDLE

    def trickle():
        for index in range(count):
            yield one_chunk(request_id="slow", chunk_index=index, chunk_count=count, batch_size=4)
            time.sleep(gap)

    with grpc.insecure_channel(server.address) as channel:
        started = time.monotonic()
        code, details = forward_error(pb_grpc.EnsemblerStub(channel).Forward(trickle(), timeout=60))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "--request-deadline" in details, details
    assert DEADLINE - 0.5 <= time.monotonic() - started <= DEADLINE + 5
    assert health(server.address) == SERVING


def test_a_connection_that_never_speaks_http2_is_closed(server):
    """A bare TCP connection: no HTTP/2 preface, no call, nothing for gRPC to time out."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=IDLE + 15) as sock:
        started, received = time.monotonic(), b""
        while chunk := sock.recv(4096):
            received += chunk
        closed_after = time.monotonic() - started
    assert IDLE - 0.5 <= closed_after <= IDLE + 5, closed_after
    assert b"handshake timeout" in received  # gRPC's GOAWAY says why
    assert health(server.address) == SERVING


GARBAGE = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08", b"\x07", b"\x12\xff\xff\xff\xff\x0f"]


def test_garbage_gets_invalid_argument_and_a_rate_limited_log_line(tmp_path, bundles):
    burst, rate, calls = 10, 1.0, 160
    server = ServerProcess(tmp_path, bundles[0], "--log-burst", str(burst), "--log-rate", "1")
    started = time.monotonic()
    with grpc.insecure_channel(server.address) as channel:
        # Raw bytes: nothing on this side serializes, so the server gets exactly these.
        forward = channel.stream_stream(FORWARD)
        describe = channel.unary_unary("/fedleak.ensembler.v1.Ensembler/Describe")
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        for i in range(calls):
            raw = GARBAGE[i % len(GARBAGE)]
            try:
                if i % 3 == 0:
                    list(forward(iter([raw]), timeout=10))
                else:
                    (describe if i % 3 == 1 else check)(raw, timeout=10)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (i, err)
                assert "not a valid protobuf message" in err.details()
            else:
                pytest.fail(f"garbage call {i} was answered")
    elapsed = time.monotonic() - started
    assert health(server.address) == SERVING
    log = server.stop_and_check()  # stopping flushes the count of lines not logged
    lines = [line for line in log.splitlines() if "rejected request" in line]
    assert all("INVALID_ARGUMENT" in line and "protobuf" in line for line in lines)
    not_logged = sum(int(n) for n in re.findall(r"(\d+) more not logged", log))
    assert len(lines) + not_logged == calls, "every rejection is logged or counted"
    assert len(lines) <= burst + rate * elapsed + 1
