"""The experimenter's end of the results channel: a gRPC server (``proto/collector.proto``) that
accepts records from the roles it gave a token to, checks them, and stores each once in the run
folder's inbox. Scoring reads the inbox; no role ever writes into the run folder.

Every token carries a :class:`Grant`: the sources it may speak for (``server``,
``participant-1``, or ``participant-*`` in a simulation, where all roles share one process
environment) and the kinds of record it may send (an honest participant only announces its node;
an attacker also sends samples or reconstructions; the server its rounds, status and the curious
server's reconstructions).
"""

from __future__ import annotations

import collections
import fnmatch
import json
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from fedleak import inbox
from fedleak.proto import collector_pb2 as pb
from fedleak.proto import collector_pb2_grpc as pb_grpc
from fedleak.reporting import MAX_MESSAGE

log = logging.getLogger(__name__)

SERVER_KINDS = frozenset({"round", "status", "reconstruction"})
HONEST_KINDS = frozenset({"node"})
ATTACKER_KINDS = frozenset({"node", "samples", "reconstruction"})
DTYPES = {"float32", "float64", "float16", "int64", "int32", "uint8", "bool"}
MAX_TENSORS = 4096


@dataclass(frozen=True)
class Grant:
    sources: tuple[str, ...]  # fnmatch patterns
    kinds: frozenset[str]

    def allows(self, source: str, kind: str) -> bool:
        return kind in self.kinds and any(fnmatch.fnmatchcase(source, p) for p in self.sources)


class Roster:
    """Who is who in this experiment: enrollment hands each asking node a participant's node
    config, the requested one or the next free one of its role, once per nonce."""

    def __init__(self, nodes: list[dict], role_of: list[str]) -> None:
        self.nodes = nodes  # node config per participant index
        self.role_of = role_of
        self.taken: dict[str, int] = {}  # nonce -> participant
        self.lock = threading.Lock()

    def enroll(self, role: str, wanted: int, nonce: str) -> int:
        """The participant index for this node; KeyError / LookupError say why not."""
        with self.lock:
            if nonce in self.taken:
                return self.taken[nonce]
            if wanted >= 0:
                if wanted >= len(self.nodes) or self.role_of[wanted] != role:
                    raise KeyError(f"this experiment has no {role} participant {wanted}")
                if wanted in self.taken.values():
                    raise LookupError(f"participant {wanted} is already taken by another node")
                index = wanted
            else:
                free = [
                    i
                    for i, r in enumerate(self.role_of)
                    if r == role and i not in self.taken.values()
                ]
                if not free:
                    total = self.role_of.count(role)
                    raise LookupError(f"all {total} {role} participant(s) are taken")
                index = free[0]
            self.taken[nonce] = index
            return index


@dataclass
class CollectorStats:
    """What the collector did; the launcher shows refusals to the user."""

    stored: int = 0
    duplicates: int = 0
    refused: collections.Counter = field(default_factory=collections.Counter)
    last_refusal: str = ""


class _Servicer(pb_grpc.CollectorServicer):
    def __init__(self, folder: Path, tokens: dict[str, Grant], roster: Roster | None) -> None:
        self.folder = folder
        self.tokens = tokens
        self.roster = roster
        self.stats = CollectorStats()
        self.lock = threading.Lock()
        self.seen = {p.stem.rsplit("-", 1)[-1] for p in inbox.entries(folder)}
        self._logged = 0.0

    def Submit(self, request: pb.Record, context: grpc.ServicerContext) -> pb.Receipt:  # noqa: N802
        grant = self.tokens.get(request.token)
        if grant is None:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "unknown report token")
        if not grant.allows(request.source, request.kind):
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token may not send {request.kind!r} records as {request.source!r}",
            )
        try:
            envelope = self._envelope(request)
            envelope.record()  # the typed record must build from what arrived
        except (ValueError, TypeError, KeyError) as err:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed record: {err}")
        with self.lock:
            duplicate = envelope.record_id in self.seen
            if duplicate:
                self.stats.duplicates += 1
            else:
                inbox.write(self.folder, envelope)
                self.seen.add(envelope.record_id)
                self.stats.stored += 1
        return pb.Receipt(record_id=request.record_id, duplicate=duplicate)

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.Enrollment:  # noqa: N802
        grant = self.tokens.get(request.token)
        if grant is None:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "unknown report token")
        if self.roster is None:
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "no enrollment here")
        if request.role not in ("honest", "attacker") or not request.nonce:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "name a role and a nonce")
        try:
            index = self.roster.enroll(request.role, request.participant, request.nonce[:64])
        except KeyError as err:
            self._refuse(context, grpc.StatusCode.NOT_FOUND, str(err.args[0]))
        except LookupError as err:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        if not grant.allows(f"participant-{index}", "node"):
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token may not speak for participant {index}",
            )
        node = json.dumps(self.roster.nodes[index])
        log.info("enrolled a %s node as participant %d", request.role, index)
        return pb.Enrollment(participant=index, node_config_json=node)

    @staticmethod
    def _envelope(request: pb.Record) -> inbox.Envelope:
        if not request.record_id or len(request.record_id) > 64 or not request.record_id.isalnum():
            raise ValueError("record_id must be 1-64 letters and digits")
        if len(request.tensors) > MAX_TENSORS:
            raise ValueError(f"more than {MAX_TENSORS} tensors")
        fields = json.loads(request.fields_json or "{}")
        if not isinstance(fields, dict):
            raise ValueError("fields_json must be a JSON object")
        tensors = {}
        for t in request.tensors:
            if t.dtype not in DTYPES:
                raise ValueError(f"tensor {t.name!r}: dtype {t.dtype!r} not accepted")
            dtype = np.dtype(t.dtype).newbyteorder("<")
            count = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
            if count * dtype.itemsize != len(t.data):
                raise ValueError(
                    f"tensor {t.name!r}: {len(t.data)} bytes for shape {list(t.shape)} {t.dtype}"
                )
            tensors[t.name] = np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))
        return inbox.Envelope(request.source, request.kind, request.record_id, fields, tensors)

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, why: str) -> None:
        with self.lock:
            self.stats.refused[code.name] += 1
            self.stats.last_refusal = why
            now = time.monotonic()
            if now - self._logged > 5.0:  # one line per 5 s at most, however many arrive
                log.warning("collector refused a record (%s): %s", code.name, why)
                self._logged = now
        context.abort(code, why)


class Collector:
    """Serve the collector until :meth:`stop`; ``address`` is where it listens."""

    def __init__(
        self,
        folder: str | Path,
        tokens: dict[str, Grant],
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
        roster: Roster | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.servicer = _Servicer(self.folder, tokens, roster)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", 1024 * 1024),
            ],
        )
        pb_grpc.add_CollectorServicer_to_server(self.servicer, self.server)
        if tls is None:
            bound = self.server.add_insecure_port(f"{host}:{port}")
        else:
            cert, key = tls
            creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            bound = self.server.add_secure_port(f"{host}:{port}", creds)
        if not bound:
            raise OSError(f"the collector cannot listen on {host}:{port}")
        self.host, self.port = host, bound

    @property
    def stats(self) -> CollectorStats:
        return self.servicer.stats

    def start(self) -> Collector:
        self.server.start()
        return self

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait(grace + 1)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
