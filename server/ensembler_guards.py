"""What keeps hostile clients from starving the Ensembler service or flooding its log.

- ``lenient_service``: a gRPC service whose requests are parsed by the service, not by gRPC, so
  bytes that are no protobuf message become an ``Undecodable`` that the handler refuses with
  INVALID_ARGUMENT, instead of a traceback in the log and INTERNAL or UNKNOWN for the client.
- ``StreamSlots``: how many Forward calls are open, per client address and in all.
- ``RateLimitedLog``: a token bucket for log lines; what it drops is counted, then summarised.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Undecodable:
    """A message that did not parse: what arrived instead of the request."""

    size: int
    error: str

    def __str__(self) -> str:
        return f"{self.size} bytes that are not a valid protobuf message ({self.error})"


def lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as err:  # whatever the parser raises, the fault is the client's
            return Undecodable(len(raw), str(err) or type(err).__name__)

    return parse


Reject = Callable[[grpc.aio.ServicerContext, str], Awaitable[None]]


class _Capture:
    """Stands in for a server while a generated ``add_*Servicer_to_server`` registers itself."""

    def __init__(self) -> None:
        self.service = ""
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, methods: dict) -> None:
        self.service, self.methods = service, dict(methods)


def lenient_service(
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    reject: Reject,
) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """(service name, method handlers) of a generated servicer, every request parsed leniently.

    A unary request that does not parse is handed to ``reject`` (which must abort the call);
    a streamed one reaches the handler, which must check for ``Undecodable`` itself.
    """
    capture = _Capture()
    add_to_server(servicer, capture)
    methods = {}
    for name, handler in capture.methods.items():
        handler = handler._replace(request_deserializer=lenient(handler.request_deserializer))
        if not handler.request_streaming:
            kind = "unary_stream" if handler.response_streaming else "unary_unary"
            handler = handler._replace(**{kind: _refusing(getattr(handler, kind), reject)})
        methods[name] = handler
    return capture.service, methods


def _refusing(behavior: Callable, reject: Reject) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await reject(context, str(request))
        return await behavior(request, context)

    return handle


def add_lenient_service(
    server: grpc.aio.Server,
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    reject: Reject,
) -> None:
    service, methods = lenient_service(add_to_server, servicer, reject)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
    server.add_registered_method_handlers(service, methods)


def peer_host(peer: str) -> str:
    """The client's address without its port: ``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``,
    ``ipv6:%5B::1%5D:5000`` -> ``::1``; anything else (a Unix socket) as it is."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6") or ":" not in rest:
        return peer
    host = urllib.parse.unquote(rest).rsplit(":", 1)[0]
    return host.strip("[]")


class StreamSlots:
    """Open Forward calls per client address and in all. Used from the event loop only."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self.open: Counter[str] = Counter()

    def acquire(self, address: str) -> str | None:
        """Takes a slot for ``address``, or says why there is none."""
        if self.open[address] >= self.per_address:
            return (
                f"{address} already has {self.open[address]} Forward calls open "
                f"(--max-streams-per-address {self.per_address})"
            )
        if sum(self.open.values()) >= self.total:
            return f"{self.total} Forward calls are open (--max-streams {self.total})"
        self.open[address] += 1
        return None

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]


class RateLimitedLog:
    """Logs at most ``burst`` lines at once and ``rate`` lines per second after that.

    Lines over the limit are counted; the count is logged (one line) before the next line that
    passes, and by ``flush`` (the service calls it every few seconds and on stop), so the log
    always accounts for every event even when a client sends thousands of bad requests.
    """

    def __init__(
        self,
        logger: logging.Logger,
        burst: int,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.rate = rate
        self.clock = clock
        self.tokens = float(burst)
        self.last = clock()
        self.suppressed = 0
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Logs the line if the budget allows; returns whether it did."""
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens < 1:
                self.suppressed += 1
                return False
            self.tokens -= 1
            self._summarise()
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def flush(self) -> None:
        with self._lock:
            self._summarise()

    def _summarise(self) -> None:
        if self.suppressed:
            self.logger.warning("%d more not logged (log rate limit)", self.suppressed)
            self.suppressed = 0
