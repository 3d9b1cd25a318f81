"""The Ensembler service's guards and settings, in process: lenient decoding, stream slots, the
rate-limited log, the limits' ranges, TLS files, and the flags that hand them on."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math

import pytest

from fedleak.proto import ensembler_pb2 as pb
from fedleak.proto import ensembler_pb2_grpc as pb_grpc
from fedleak.server.ensembler_guards import (
    RateLimitedLog,
    StreamSlots,
    Undecodable,
    lenient,
    lenient_service,
    peer_host,
)
from fedleak.server.ensembler_options import (
    ServiceLimits,
    add_arguments,
    check_transport,
    limits_from_args,
    to_argv,
)


def test_lenient_parsing_turns_bad_bytes_into_a_value():
    parse = lenient(pb.FeatureChunk.FromString)
    good = pb.FeatureChunk(request_id="r", chunk_count=1)
    assert parse(good.SerializeToString()) == good
    bad = parse(b"\x0a\x05ab")  # field 1 says 5 bytes, 2 follow
    assert isinstance(bad, Undecodable) and bad.size == 4
    assert str(bad).startswith("4 bytes that are not a valid protobuf message (")


def test_lenient_service_refuses_unary_garbage_and_passes_the_rest():
    refused: list[str] = []

    async def reject(context, what: str) -> None:
        refused.append(what)
        raise RuntimeError("aborted")  # what context.abort does

    class Servicer(pb_grpc.EnsemblerServicer):
        async def Describe(self, request, context):
            return pb.ServerInfo(num_nets=3)

    name, methods = lenient_service(pb_grpc.add_EnsemblerServicer_to_server, Servicer(), reject)
    assert name == "fedleak.ensembler.v1.Ensembler" and set(methods) == {"Describe", "Forward"}
    for handler in methods.values():
        assert isinstance(handler.request_deserializer(b"\x07"), Undecodable)
    describe = methods["Describe"]
    request = describe.request_deserializer(b"")
    assert asyncio.run(describe.unary_unary(request, None)).num_nets == 3
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(describe.unary_unary(describe.request_deserializer(b"\x07"), None))
    assert len(refused) == 1 and "not a valid protobuf message" in refused[0]


def test_peer_host_drops_the_port():
    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_host("ipv6:%5B::1%5D:5000") == "::1"
    assert peer_host("ipv6:[2001:db8::7]:443") == "2001:db8::7"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"


def test_stream_slots_bound_each_address_and_the_total():
    slots = StreamSlots(per_address=2, total=3)
    assert slots.acquire("a") is None and slots.acquire("a") is None
    assert "--max-streams-per-address 2" in slots.acquire("a")
    assert slots.acquire("b") is None
    assert "--max-streams 3" in slots.acquire("c")
    slots.release("a")
    assert slots.acquire("c") is None
    for address in ("a", "b", "c"):
        slots.release(address)
    assert not slots.open


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_counts_what_it_drops(caplog):
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.limited"), burst=3, rate=0.5, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.limited"):
        sent = [limited.log(logging.INFO, "line %d", i) for i in range(10)]
        assert sent == [True] * 3 + [False] * 7
        clock.now = 2.0  # one token back
        assert limited.log(logging.INFO, "after")
        assert not limited.log(logging.INFO, "dropped")
        limited.flush()
        limited.flush()  # nothing more to say
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "line 0",
        "line 1",
        "line 2",
        "7 more not logged (log rate limit)",
        "after",
        "1 more not logged (log rate limit)",
    ]


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_limits_have_ranges_and_name_the_flag():
    assert limits_from_args(parse()) == ServiceLimits()
    assert limits_from_args(parse("--idle-timeout", "2.5")).idle_timeout == 2.5
    for argv, flag in [
        (("--idle-timeout", "0"), "--idle-timeout"),
        (("--request-deadline", "nan"), "--request-deadline"),
        (("--request-deadline", "inf"), "--request-deadline"),
        (("--workers", "0"), "--workers"),
        (("--log-rate", "-1"), "--log-rate"),
        (("--max-streams-per-address", "200"), "--max-streams-per-address"),
    ]:
        with pytest.raises(ValueError, match=f"^{flag}"):
            limits_from_args(parse(*argv))
    assert math.isfinite(ServiceLimits().request_deadline)


def test_flags_round_trip_through_the_command_line(tmp_path):
    args = parse("--idle-timeout", "3", "--workers", "2", "--tls-cert", "c.pem", "--tls-key", "k")
    again = parse(*to_argv(args))
    assert vars(again) == vars(args)


def test_plain_text_needs_insecure_off_loopback():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_transport(host, None, insecure=False)
    with pytest.raises(ValueError, match="--insecure"):
        check_transport("0.0.0.0", None, insecure=False)
    check_transport("0.0.0.0", None, insecure=True)
