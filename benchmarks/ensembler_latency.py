"""Latency of the Ensembler server: N nets at once vs N single calls, and what gRPC adds.

Setting: N=10 random-initialised server nets (ResNet-18 layer1..avgpool), one batch of B random
64x16x16 features. Per batch it times, interleaved over the repeats after a warm-up, the median
of

- ``single``: one net on the batch (the loop runner with one net); ``10 x single`` is the budget;
- ``vmap`` and ``loop``: the N nets through ``EnsembleRunner`` in each mode;
- ``remote``: ``RemoteEnsemble.forward`` against a server started in this process on loopback
  (``serve``, same device, runner mode ``auto``: the loop on the CPU, vmap on a GPU);
- ``transport``: the same remote call against a server whose nets are replaced by zeros of the
  right shape: messages, loopback network, validation, everything but the nets;
- ``serde``: building and parsing every request and answer message alone (encode, protobuf
  serialize, parse, decode), no network and no nets.

The transport share is reported twice: ``transport / remote`` (robust) and ``(remote - runner) /
remote`` (a difference of two noisy timings). ``single`` reuses one net, whose weights stay in
the CPU caches, while N nets stream N times the weights, so at small batches ``N x single``
flatters the single net.

Targets: ``runner / (N x single) <= 1`` and ``(remote - runner) / remote <= 10%``, where
``runner`` is the mode the server uses. Uses the GPU
when there is one (``--device``).

    python benchmarks/ensembler_latency.py [--nets 10] [--batch 32] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedleak.clients.ensembler_client import RemoteEnsemble
from fedleak.models.ensembler import FEATURE_DIM, ServerBundle, save_server_bundle, server_net
from fedleak.proto import ensembler_pb2 as pb
from fedleak.proto import wire
from fedleak.server.ensemble_runner import EnsembleRunner, default_mode, resolve_device
from fedleak.server.ensembler_service import (
    DEFAULT_MAX_BATCH,
    EnsemblerServer,
    EnsemblerServicer,
    serve,
)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return timed


def round_trip_messages(features: torch.Tensor, num_nets: int) -> None:
    """Everything the wire costs except the network: both directions, as the client chunks."""
    limit = wire.DEFAULT_MAX_MESSAGE_BYTES
    sample_bytes = wire.payload_bytes(features.shape[1:], pb.FLOAT32)
    runs = wire.split_batch(features.shape[0], sample_bytes, limit)
    outputs = torch.randn(num_nets, features.shape[0], FEATURE_DIM)
    for start, stop in runs:
        code, data = wire.encode(features[start:stop])
        raw = pb.FeatureChunk(
            request_id="x", shape=features[start:stop].shape, dtype=code, data=data
        ).SerializeToString()
        msg = pb.FeatureChunk.FromString(raw)
        wire.decode(msg.data, tuple(msg.shape), msg.dtype)
        code, data = wire.encode(outputs[:, start:stop])
        raw = pb.OutputChunk(
            shape=outputs[:, start:stop].shape, dtype=code, data=data
        ).SerializeToString()
        msg = pb.OutputChunk.FromString(raw)
        wire.decode(msg.data, tuple(msg.shape), msg.dtype)


class ZeroNets:
    """Stands in for EnsembleRunner: answers zeros at once, so only the transport is timed."""

    def __init__(self, num_nets: int) -> None:
        self.num_nets = num_nets

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.num_nets, features.shape[0], FEATURE_DIM)


def transport_only_server(num_nets: int) -> EnsemblerServer:
    servicer = EnsemblerServicer(
        ZeroNets(num_nets),  # type: ignore[arg-type]
        (64, 16, 16),
        "bench",
        max_message_bytes=wire.DEFAULT_MAX_MESSAGE_BYTES,
        max_batch=DEFAULT_MAX_BATCH,
    )
    return EnsemblerServer(servicer)


def measure(num_nets: int, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    nets = [server_net().eval() for _ in range(num_nets)]
    features = torch.randn(batch, 64, 16, 16)
    on_device = features.to(device)
    runners = {
        "single": EnsembleRunner(nets[:1], device, mode="loop"),
        "vmap": EnsembleRunner(nets, device, mode="vmap"),
        "loop": EnsembleRunner(nets, device, mode="loop"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        bundle = save_server_bundle(ServerBundle(nets, (64, 16, 16), "bench"), Path(tmp) / "s.pt")
        server = serve(bundle, device=str(device))
    remote = RemoteEnsemble(f"127.0.0.1:{server.port}", timeout=600)
    zero_server = transport_only_server(num_nets)
    zero_remote = RemoteEnsemble(f"127.0.0.1:{zero_server.port}", timeout=600)
    cases: dict[str, Callable[[], object]] = {
        name: (lambda r=runner: r(on_device)) for name, runner in runners.items()
    }
    cases["remote"] = lambda: remote.forward(features)
    cases["transport"] = lambda: zero_remote.forward(features)
    cases["serde"] = lambda: round_trip_messages(features, num_nets)
    timed = _timer(device)
    try:
        times: dict[str, list[float]] = {name: [] for name in cases}
        for fn in cases.values():  # warm-up: allocator, kernels, vmap's first trace, channel
            fn()
        for _ in range(repeats):
            for name, fn in cases.items():
                times[name].append(timed(fn))
    finally:
        remote.close()
        zero_remote.close()
        server.stop(None)
        zero_server.stop(None)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(r: dict[str, float], num_nets: int, batch: int, device: torch.device) -> None:
    budget = num_nets * r["single"]
    mode = default_mode(device)  # what the server's runner uses
    runner = r[mode]
    print(f"device {device}, torch threads {torch.get_num_threads()}, N={num_nets}, B={batch}")
    for name in ("single", "vmap", "loop", "remote", "transport", "serde"):
        print(f"  {name:8s} {1000 * r[name]:9.1f} ms")
    print(f"  {num_nets} x single {1000 * budget:9.1f} ms")
    print(f"server runner mode       = {mode}")
    print(f"runner / ({num_nets} x single) = {runner / budget:.3f}   (target <= 1)")
    print(f"vmap / ({num_nets} x single)   = {r['vmap'] / budget:.3f}")
    print(f"loop / ({num_nets} x single)   = {r['loop'] / budget:.3f}")
    print(f"vmap / loop              = {r['vmap'] / r['loop']:.3f}")
    print(f"transport / remote       = {100 * r['transport'] / r['remote']:.1f}%  (target <= 10%)")
    overhead = (r["remote"] - runner) / r["remote"]
    print(f"(remote - runner) / remote = {100 * overhead:.1f}%  (the same, as a difference)")
    print(f"serde / remote           = {100 * r['serde'] / r['remote']:.1f}%")
    print(f"throughput remote        = {batch / r['remote']:.1f} samples/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nets", type=int, default=10)
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    for batch in args.batch:
        report(measure(args.nets, batch, args.repeats, device), args.nets, batch, device)


if __name__ == "__main__":
    main()
