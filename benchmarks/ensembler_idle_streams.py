"""Latency of valid Ensembler requests while idle Forward streams hold the server, against the
idle-free latency measured in the same run.

A real server process (``python -m fedleak.server.ensembler_service``) serves N random server
nets. For each count of idle streams (0, 8, 64, 256, then 0 again), this script opens that many
Forward calls that never send (over 16 streams per connection, each connection its own), then
times ``--repeats`` valid requests (``RemoteEnsemble.forward`` of a B-sample batch) and as many
health checks, one after the other. It checks that every idle stream is still open afterwards,
and that the server really holds them: the server admits ``max(idle) + 1`` Forward calls per
address, so after topping up to that many idle calls, one more call must be refused
(RESOURCE_EXHAUSTED). The server's idle timeout is set beyond the run, so the streams stay.

Target: valid latency within 2x the idle-free latency at every count, health always SERVING.

    python benchmarks/ensembler_idle_streams.py [--nets 3] [--batch 8] [--repeats 20]
        [--idle 8 64 256] [--threads 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedleak.clients.ensembler_client import EnsemblerError, RemoteEnsemble
from fedleak.ensembler.remote import server_process
from fedleak.models.ensembler import ServerBundle, save_server_bundle, server_net
from fedleak.proto import ensembler_pb2_grpc as pb_grpc

STREAMS_PER_CONNECTION = 16
SERVING = health_pb2.HealthCheckResponse.SERVING


class IdleStreams:
    """Forward calls that open and never send, held by an asyncio loop on its own thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.calls: list[grpc.aio.StreamStreamCall] = []
        self.channels: list[grpc.aio.Channel] = []

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(120)

    def open(self, count: int) -> None:
        self._run(self._open(count))

    async def _open(self, count: int) -> None:
        calls = []
        for i in range(count):
            if (len(self.calls) + i) % STREAMS_PER_CONNECTION == 0:
                # A channel of its own: grpc shares one connection between equal channels.
                self.channels.append(
                    grpc.aio.insecure_channel(
                        self.address, options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                )
            calls.append(pb_grpc.EnsemblerStub(self.channels[-1]).Forward())
        await asyncio.gather(*(c.wait_for_connection() for c in calls))
        self.calls += calls

    def still_open(self) -> int:
        return sum(not c.done() for c in self.calls)

    def close(self) -> None:
        async def close() -> None:
            for c in self.calls:
                c.cancel()
            for ch in self.channels:
                await ch.close()

        self._run(close())
        self.calls, self.channels = [], []

    def stop(self) -> None:
        self.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def held_by_server(idle: IdleStreams, remote: RemoteEnsemble, per_address: int) -> bool:
    """Top up to the per-address bound: one more Forward must then be refused."""
    extra = per_address - len(idle.calls)
    idle.open(extra)
    time.sleep(0.5)  # the last headers reach the server
    try:
        remote.forward(torch.zeros(1, 64, 16, 16))
        refused = False
    except EnsemblerError as err:
        refused = err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in idle.calls[-extra:]:
        idle.loop.call_soon_threadsafe(call.cancel)
    idle.calls = idle.calls[:-extra]
    time.sleep(0.5)  # the server releases their slots
    return refused


def phase(
    count: int,
    idle: IdleStreams,
    remote: RemoteEnsemble,
    health: health_pb2_grpc.HealthStub,
    features: torch.Tensor,
    repeats: int,
    per_address: int,
) -> dict:
    idle.open(count)
    time.sleep(0.5)
    valid, checks, statuses = [], [], []
    for _ in range(repeats):
        seconds, _ = timed(lambda: remote.forward(features))
        valid.append(seconds)
        seconds, reply = timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))
        checks.append(seconds)
        statuses.append(reply.status)
    still_open = idle.still_open()
    held = held_by_server(idle, remote, per_address) if count else True
    idle.close()
    return {
        "idle": count,
        "valid": statistics.median(valid),
        "valid_p90": statistics.quantiles(valid, n=10)[-1],
        "health": statistics.median(checks),
        "serving": sum(s == SERVING for s in statuses),
        "checks": len(statuses),
        "still_open": still_open,
        "held": held,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nets", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--idle", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--threads", type=int, default=1, help="torch threads (server and here)")
    p.add_argument("--workers", type=int, default=2, help="the server's --workers")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    per_address = max(args.idle) + 1
    limits = ["--idle-timeout", "3600", "--request-deadline", "3600", "--workers"]
    limits += [str(args.workers), "--max-streams-per-address", str(per_address)]
    limits += ["--max-streams", str(per_address)]
    torch.manual_seed(0)
    features = torch.randn(args.batch, 64, 16, 16)
    with tempfile.TemporaryDirectory() as tmp:
        nets = [server_net().eval() for _ in range(args.nets)]
        bundle = save_server_bundle(ServerBundle(nets, (64, 16, 16), "bench"), Path(tmp) / "s.pt")
        with server_process(
            bundle, None, Path(tmp) / "server.log", threads=args.threads, extra_args=limits
        ) as server:
            idle = IdleStreams(server.address)
            channel = grpc.insecure_channel(server.address)
            health = health_pb2_grpc.HealthStub(channel)
            try:
                with RemoteEnsemble(server.address, timeout=600) as remote:
                    remote.forward(features)  # warm-up: allocator, channel
                    rows = [
                        phase(n, idle, remote, health, features, args.repeats, per_address)
                        for n in [0, *args.idle, 0]
                    ]
            finally:
                idle.stop()
                channel.close()
            alive = server.popen.poll() is None
    report(rows, args, alive)


def report(rows: list[dict], args: argparse.Namespace, alive: bool) -> None:
    base = rows[0]["valid"]
    print(
        f"N={args.nets} nets, B={args.batch}, {args.repeats} valid requests and health checks "
        f"per row, torch threads {args.threads}, server workers {args.workers}"
    )
    print("  idle  valid median  valid p90  ratio  health median  SERVING  still open  held")
    for r in rows:
        print(
            f"  {r['idle']:4d}  {1000 * r['valid']:9.1f} ms  {1000 * r['valid_p90']:6.1f} ms"
            f"  {r['valid'] / base:5.2f}  {1000 * r['health']:10.2f} ms  "
            f"{r['serving']:3d}/{r['checks']:<3d}  {r['still_open']:6d}/{r['idle']:<4d}"
            f"  {'yes' if r['held'] else 'NO'}"
        )
    worst = max(r["valid"] / base for r in rows)
    healthy = all(r["serving"] == r["checks"] for r in rows)
    held = all(r["held"] and r["still_open"] == r["idle"] for r in rows)
    print(f"worst ratio to idle-free = {worst:.2f}   (target <= 2)")
    print(f"health always SERVING    = {healthy}")
    print(f"idle streams held open   = {held}")
    print(f"server alive at the end  = {alive}")


if __name__ == "__main__":
    main()
