"""How a role hands a record to the experimenter.

The ServerApp and the attackers call :meth:`Reporter.send`. With a collector address (the run
config's ``deployment.collector``, set by ``fedleak run``) the record goes over gRPC
(``proto/collector.proto``), authenticated by the report token in this process's environment
(``FEDLEAK_REPORT_TOKEN``; only the server's and the attackers' processes are given one) and over
TLS when ``FEDLEAK_REPORT_CA`` names the CA certificate. Without an address, or when the collector
cannot be reached within a bounded retry, the record is written into the role's own folder
instead (``inbox/``), never lost and never raised into the federation.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from fedleak.inbox import INBOX, Envelope, write
from fedleak.records import Record
from fedleak.settings import FederationSettings, ParticipantSpec

log = logging.getLogger(__name__)

TOKEN_ENV = "FEDLEAK_REPORT_TOKEN"
CA_ENV = "FEDLEAK_REPORT_CA"  # PEM file of the CA that signed the collector's certificate
SERVER_NAME_ENV = "FEDLEAK_REPORT_SERVER_NAME"  # TLS name to expect, if not the address's host
MAX_MESSAGE = 256 * 1024 * 1024
RETRY_SECONDS = 30.0  # how long one record is retried before it goes to the local folder


class Reporter:
    def __init__(self, source: str, collector: str, fallback: str | Path) -> None:
        self.source = source
        self.collector = collector
        self.fallback = Path(fallback)
        self.token = os.environ.get(TOKEN_ENV, "")
        self._stub = None
        self._healthy = True  # after a failure, later records are tried once, not retried

    def send(self, record: Record) -> bool:
        """Deliver ``record``; True if the collector has it, False if it went to the fallback."""
        envelope = Envelope.of(self.source, record, uuid.uuid4().hex)
        if self.collector and self.token:
            deadline = time.monotonic() + (RETRY_SECONDS if self._healthy else 0.0)
            delay = 0.5
            while True:
                try:
                    self._submit(envelope)
                    self._healthy = True
                    return True
                except Exception as err:  # grpc.RpcError and anything the channel raises
                    if _final(err) or time.monotonic() + delay > deadline:
                        log.warning(
                            "cannot report %s to the collector at %s: %s; kept in %s",
                            record.kind,
                            self.collector,
                            _reason(err),
                            self.fallback,
                        )
                        self._healthy = False
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
        elif self.collector:
            log.warning("no %s in this process's environment: reports stay local", TOKEN_ENV)
        write(self.fallback, envelope)
        return False

    def _submit(self, envelope: Envelope) -> None:
        from fedleak.proto import collector_pb2 as pb

        message = pb.Record(
            token=self.token,
            source=envelope.source,
            kind=envelope.kind,
            record_id=envelope.record_id,
            fields_json=json.dumps(envelope.fields, allow_nan=False),
            tensors=[
                pb.Tensor(name=k, dtype=str(v.dtype), shape=list(v.shape), data=v.tobytes())
                for k, v in envelope.tensors.items()
            ],
        )
        self._channel_stub().Submit(message, timeout=30)

    def _channel_stub(self):
        if self._stub is None:
            import grpc

            from fedleak.proto import collector_pb2_grpc as pb_grpc

            options = [
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ]
            ca = os.environ.get(CA_ENV)
            if ca:
                name = os.environ.get(SERVER_NAME_ENV)
                if name:
                    options.append(("grpc.ssl_target_name_override", name))
                creds = grpc.ssl_channel_credentials(Path(ca).read_bytes())
                channel = grpc.secure_channel(self.collector, creds, options=options)
            else:
                channel = grpc.insecure_channel(self.collector, options=options)
            self._stub = pb_grpc.CollectorStub(channel)
        return self._stub


def _final(err: Exception) -> bool:
    """Refusals that a retry cannot fix."""
    code = getattr(err, "code", None)
    name = getattr(code(), "name", "") if callable(code) else ""
    return name in (
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
    )


def _reason(err: Exception) -> str:
    details = getattr(err, "details", None)
    return details() if callable(details) else f"{type(err).__name__}: {err}"


def participant_reporter(spec: ParticipantSpec, settings: FederationSettings) -> Reporter:
    """An attacker's channel to the experimenter; its own out-dir keeps what cannot be sent."""
    fallback = Path(spec.out_dir or spec.state_dir or "attacker-out") / INBOX
    return Reporter(f"participant-{spec.index}", settings.deployment.collector, fallback)


def server_reporter(settings: FederationSettings, run_id: int) -> Reporter:
    """The ServerApp's channel; without a collector its records stay on the server's host."""
    fallback = Path(settings.run.out_dir) / f"flwr-{run_id}" / INBOX
    return Reporter("server", settings.deployment.collector, fallback)
