"""The Ensembler gRPC service: generated code in sync, wire format, and a real server process
(``python -m fedleak.server.ensembler_service``) answering correct, concurrent and malformed
requests."""

from __future__ import annotations

import ast
import importlib.metadata
import math
import random
import threading

import ensembler_helpers as helpers
import grpc
import pytest
import torch
from ensembler_helpers import MAX_BATCH, REPO, SHAPE, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedleak.clients.ensembler_client import EnsemblerError, RemoteEnsemble, classify
from fedleak.data import load_dataset
from fedleak.proto import ensembler_pb2 as pb
from fedleak.proto import ensembler_pb2_grpc as pb_grpc
from fedleak.proto import wire
from fedleak.proto.generate import generate
from fedleak.server.ensembler_service import SERVICE_NAME, ChunkValidator, load_recordings

bundles, reference = helpers.bundles, helpers.reference  # fixtures, used here by name
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


# --- generated code -------------------------------------------------------------------------


def embedded_descriptor(source: str) -> bytes:
    """The serialized FileDescriptorProto a generated ``_pb2.py`` registers."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return node.args[0].value
    raise AssertionError("no AddSerializedFile call in the generated module")


def test_generated_code_matches_the_proto(tmp_path):
    """Regenerate into a temp dir: the committed modules must be what protoc makes today."""
    pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is a dev dependency")
    fresh, committed = generate(tmp_path), REPO / "proto"
    # The schema itself, whatever grpcio-tools version generated the committed modules.
    schema = embedded_descriptor((fresh / "ensembler_pb2.py").read_text())
    assert schema == pb.DESCRIPTOR.serialized_pb, "regenerate the modules (see proto/README.md)"
    # Byte for byte when this grpcio-tools is the one the committed modules were made with.
    if importlib.metadata.version("grpcio-tools") != pb_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(f"byte comparison needs grpcio-tools=={pb_grpc.GRPC_GENERATED_VERSION}")
    for name in ("ensembler_pb2.py", "ensembler_pb2_grpc.py"):
        assert (fresh / name).read_bytes() == (committed / name).read_bytes(), name


# --- wire format and validation, in process ---------------------------------------------------


def test_split_batch_is_even_and_fits():
    assert wire.split_batch(10, 100, 100 * 4 + wire.HEADER_ALLOWANCE) == [(0, 3), (3, 6), (6, 10)]
    assert wire.split_batch(1, 100, 10_000) == [(0, 1)]
    with pytest.raises(ValueError, match="does not fit"):
        wire.split_batch(1, 10_000, 10_000)


def test_encode_decode_round_trip():
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(2, 3, 4).to(dtype)
        code, data = wire.encode(x)
        assert len(data) == wire.payload_bytes(x.shape, code)
        y = wire.decode(data, (2, 3, 4), code)
        assert y.dtype == dtype and torch.equal(x, y)
    with pytest.raises(ValueError):
        wire.encode(torch.zeros(1, dtype=torch.float64))


def chunk(samples: int = 1, **fields) -> pb.FeatureChunk:
    """A valid one-chunk request unless ``fields`` say otherwise (data follows shape/dtype)."""
    base = dict(request_id="r1", chunk_index=0, chunk_count=1, batch_size=samples)
    base.update(shape=[samples, *SHAPE], dtype=pb.FLOAT32)
    base.update(fields)
    if "data" not in fields:
        base["data"] = bytes(wire.payload_bytes(base["shape"], base["dtype"] or pb.FLOAT32))
    return pb.FeatureChunk(**base)


def test_validator_accepts_a_complete_request_and_names_the_problem():
    v = ChunkValidator(SHAPE, MAX_BATCH, wire.DEFAULT_MAX_MESSAGE_BYTES)
    v.accept(chunk(2, batch_size=3, chunk_count=2))
    v.accept(chunk(1, batch_size=3, chunk_count=2, chunk_index=1))
    v.finish()
    v = ChunkValidator(SHAPE, MAX_BATCH, wire.DEFAULT_MAX_MESSAGE_BYTES)
    v.accept(chunk(1, batch_size=2, chunk_count=2))
    with pytest.raises(Exception, match="incomplete request: 1 of 2 chunks"):
        v.finish()
    v = ChunkValidator(SHAPE, MAX_BATCH, wire.DEFAULT_MAX_MESSAGE_BYTES)
    with pytest.raises(Exception, match="payload is 3 bytes"):
        v.accept(chunk(data=b"abc"))


# --- a real server process --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):
    # Every rejection logged: the malformed-request test reads them (the rate limit has its
    # own test in test_ensembler_hostile.py).
    proc = ServerProcess(tmp_path_factory.mktemp("server"), bundles[0], "--log-burst", "10000")
    yield proc
    proc.stop_and_check()


@pytest.mark.integration
def test_describe_and_health(server):
    with RemoteEnsemble(server.address) as remote:
        info = remote.describe()
    assert info["num_nets"] == 2 and info["input_shape"] == SHAPE
    assert info["model_version"] == "test-v1" and info["feature_dim"] == 512
    assert info["input_dtypes"] == ["float32", "float16"] and info["output_dtype"] == "float32"
    assert info["max_batch"] == MAX_BATCH and info["max_message_bytes"] == 4 * 1024 * 1024
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.integration
def test_remote_pipeline_equals_local(server, bundles, reference, data_root):
    from fedleak.models.ensembler import load_client_bundle

    client = load_client_bundle(bundles[1])
    images = load_dataset("cifar10", "test", data_root).images[:10]
    with torch.no_grad():
        local = client.decode(reference(client.encode(images)))
    # Small messages and max_batch 8: 10 images are 2 requests of several chunks each way.
    with RemoteEnsemble(server.address, max_message_bytes=200_000) as remote:
        remote_logits = classify(client, remote, images, batch_size=10)
    torch.testing.assert_close(remote_logits, local, rtol=1e-4, atol=1e-4)
    # The curious server kept exactly what the client sent, and nothing of the secret.
    kept = torch.cat([f for _, f in load_recordings(server.record)[-2:]])
    with torch.no_grad():
        torch.testing.assert_close(kept, client.encode(images))


@pytest.mark.integration
def test_half_precision_features(server, reference):
    x = torch.randn(1, *SHAPE).half()
    with RemoteEnsemble(server.address) as remote:
        out = remote.forward(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_answers_are_split_to_fit_the_client(server, reference):
    # 3 samples, room for 2 samples' outputs per message: two answers, as even as can be.
    x = torch.randn(3, *SHAPE)
    limit = 2 * 2 * 512 * 4 + wire.HEADER_ALLOWANCE
    request = chunk(3, data=wire.encode(x)[1], max_response_bytes=limit)
    with grpc.insecure_channel(server.address) as channel:
        replies = list(pb_grpc.EnsemblerStub(channel).Forward(iter([request]), timeout=60))
    assert [(r.chunk_index, r.batch_offset, list(r.shape)) for r in replies] == [
        (0, 0, [2, 1, 512]),
        (1, 1, [2, 2, 512]),
    ]
    assert all(r.request_id == "r1" and r.dtype == pb.FLOAT32 for r in replies)
    out = torch.cat([wire.decode(r.data, tuple(r.shape), r.dtype) for r in replies], dim=1)
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_concurrent_clients(server, reference):
    inputs = [torch.randn(1, *SHAPE) for _ in range(8)]
    outputs: list[torch.Tensor | BaseException | None] = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def one_client(i: int) -> None:
        try:
            with RemoteEnsemble(server.address, timeout=120) as remote:  # its own channel
                remote.describe()
                start.wait()
                outputs[i] = remote.forward(inputs[i])
        except BaseException as err:  # reported below, with its index
            outputs[i] = err

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = reference(torch.cat(inputs))
    for i, out in enumerate(outputs):
        assert isinstance(out, torch.Tensor), f"client {i}: {out!r}"
        torch.testing.assert_close(out, expected[:, i : i + 1], rtol=1e-4, atol=1e-4)


def malformed_requests(rng: random.Random) -> list[tuple[str, list[pb.FeatureChunk], object]]:
    """(what is wrong, the chunks, expected status) for every kind of broken request."""
    one = wire.payload_bytes((1, *SHAPE), pb.FLOAT32)
    good = chunk().data
    cases: list[tuple[str, list[pb.FeatureChunk], object]] = []

    def add(name, chunks, code=INVALID):
        cases.append((name, chunks, code))

    # Wrong shapes, each with a payload that matches it, so the shape check is what fails.
    for shape in (
        [1, 64, 16, 15],
        [1, 3, 32, 32],
        [1, 64, 16],
        [1, 64, 16, 16, 1],
        [0, *SHAPE],
        [],
        [1, 65, 16, 16],
        [1, 16, 16, 64],
    ):
        data = bytes(wire.payload_bytes(shape, pb.FLOAT32)) if shape else b""
        add(f"shape {shape}", [chunk(shape=shape, data=data)])
    add("batch above max_batch", [chunk(MAX_BATCH + 1)])
    # Wrong dtypes: unspecified, unknown codes.
    for code in (pb.DTYPE_UNSPECIFIED, 3, 7, 1000):
        add(f"dtype {code}", [chunk(dtype=code, data=good)])
    # NaN and infinities anywhere, in both accepted dtypes.
    for bad in (math.nan, math.inf, -math.inf):
        for dtype in (torch.float32, torch.float16):
            x = torch.zeros(1, *SHAPE, dtype=dtype)
            x.view(-1)[rng.randrange(x.numel())] = bad
            code, data = wire.encode(x)
            add(f"{bad} in {dtype}", [chunk(dtype=code, data=data)])
    # Truncated or padded payloads.
    for cut in (1, 2, 3, 4, 100, one - 1, one):
        add(f"payload short by {cut}", [chunk(data=good[: one - cut])])
    for extra in (1, 4, one):
        add(f"payload {extra} too long", [chunk(data=good + bytes(extra))])
    add("float16 payload sent as float32", [chunk(dtype=pb.FLOAT32, data=good[: one // 2])])
    # Missing or bad header fields.
    for rid in ("", ".hidden", "../escape", "a/b", "a" * 129, "white space", "é"):
        add(f"request_id {rid!r}", [chunk(request_id=rid)])
    add("chunk_count 0", [chunk(chunk_count=0)])
    add("batch_size 0", [chunk(batch_size=0)])
    add("more chunks than samples", [chunk(chunk_count=2)])
    add("empty stream", [])
    # Inconsistent chunks: gaps, repeats, order, fields that change, too few or too many.
    two = dict(batch_size=2, chunk_count=2)
    add("starts at chunk 1", [chunk(chunk_index=1, **two)])
    add("gap", [chunk(**two), chunk(chunk_index=2, **two)])
    add("duplicate", [chunk(**two), chunk(**two)])
    add("id changes", [chunk(**two), chunk(chunk_index=1, request_id="r2", **two)])
    add("count changes", [chunk(**two), chunk(chunk_index=1, batch_size=2, chunk_count=3)])
    add("batch_size changes", [chunk(**two), chunk(chunk_index=1, batch_size=3, chunk_count=2)])
    half = chunk(dtype=pb.FLOAT16, chunk_index=1, **two)
    add("dtype changes", [chunk(**two), half])
    add("too few chunks", [chunk(**two)])
    add("too many chunks", [chunk(), chunk(chunk_index=1)])
    add("too many samples", [chunk(**two), chunk(2, chunk_index=1, **two)])
    add(
        "too few samples",
        [chunk(batch_size=3, chunk_count=2), chunk(chunk_index=1, batch_size=3, chunk_count=2)],
    )
    # Too large: one message over the server's 4 MiB, or answers that cannot fit the client.
    big = [MAX_BATCH, *SHAPE]
    add("5 MiB message", [chunk(data=bytes(5 << 20))], EXHAUSTED)
    add("oversized batch message", [chunk(MAX_BATCH, shape=big, data=bytes(5 << 20))], EXHAUSTED)
    add("response limit too small", [chunk(max_response_bytes=100)], EXHAUSTED)
    return cases


def forward_status(stub: pb_grpc.EnsemblerStub, chunks: list[pb.FeatureChunk]) -> object:
    try:
        for _ in stub.Forward(iter(chunks), timeout=60):
            pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.integration
def test_malformed_requests_are_refused_and_the_server_lives_on(server, reference):
    rng = random.Random(0)
    # Cases whose first chunk is valid cost the server a forward pass: those run once; the
    # cheap ones are drawn again (fresh NaN positions) until there are 500 requests.
    plan = malformed_requests(rng)
    costly = {name for name, chunks, _ in plan if len(chunks) > 1 or name == "too few chunks"}
    while len(plan) < 500:
        plan += [case for case in malformed_requests(rng) if case[0] not in costly]
    options = [("grpc.max_send_message_length", 64 << 20)]  # so the server sees oversized ones
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.EnsemblerStub(channel)
        for name, chunks, expected in plan:
            assert forward_status(stub, chunks) == expected, name
    assert len(plan) >= 500
    assert server.proc.poll() is None
    x = torch.randn(1, *SHAPE)
    with RemoteEnsemble(server.address) as remote:
        torch.testing.assert_close(remote.forward(x), reference(x), rtol=1e-4, atol=1e-4)
    log = server.log.read_text()
    assert "request_id is missing" in log and "NaN or infinity" in log


@pytest.mark.integration
def test_client_side_errors(server, bundles):
    from fedleak.models.ensembler import load_client_bundle

    with RemoteEnsemble(server.address, timeout=0.01) as remote:
        remote._info = {**RemoteEnsemble(server.address).describe()}  # describe in time
        with pytest.raises(EnsemblerError, match="DEADLINE_EXCEEDED") as err:
            remote.forward(torch.zeros(MAX_BATCH, *SHAPE))  # 8 samples take far over 10 ms
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with RemoteEnsemble(server.address) as remote:
        with pytest.raises(ValueError, match="B x 64 x 16 x 16"):
            remote.forward(torch.zeros(1, 3, 32, 32))
        assert remote.forward(torch.zeros(0, *SHAPE)).shape == (2, 0, 512)
        client = load_client_bundle(bundles[1])
        client.server_version = "other"
        with pytest.raises(EnsemblerError, match="model version"):
            classify(client, remote, torch.zeros(1, 3, 32, 32))
    with RemoteEnsemble("127.0.0.1:1", timeout=5) as remote:  # nothing listens on port 1
        with pytest.raises(EnsemblerError) as err:
            remote.describe()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.integration
def test_command_line_client(server, bundles, data_root, capsys):
    from fedleak.clients.ensembler_client import main

    args = ["--bundle", str(bundles[1]), "--server", server.address, "--images", "3"]
    assert main([*args, "--data-root", str(data_root)]) == 0
    assert capsys.readouterr().out.startswith("accuracy ")
    assert main([*args, "--bundle", str(bundles[0])]) == 2  # a server bundle: a clear error
    assert "is not a fedleak-ensembler-client/1 bundle" in capsys.readouterr().err
