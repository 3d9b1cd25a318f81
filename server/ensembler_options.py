"""The Ensembler service's limits and TLS files: typed, checked, and their command-line flags.

Imports neither torch nor grpc, so ``fedleak ensembler serve`` can build its parser from these
flags without loading the service.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import ssl
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ServiceLimits:
    """What one client may hold of the service; every bound is per server process.

    ``request_deadline``: seconds a whole Forward call may take, reading, running and answering.
    ``idle_timeout``: seconds the server waits for a client's next chunk (its first included),
    and for a new connection's handshake. ``max_streams_per_address``, ``max_streams``: Forward
    calls open at once from one client address and in all. ``workers``: threads that decode
    payloads and run the nets (the event loop that answers health checks is not one of them).
    ``log_burst``, ``log_rate``: rejected requests logged at once, then per second; the rest are
    counted in a summary line.
    """

    request_deadline: float = 300.0
    idle_timeout: float = 30.0
    max_streams_per_address: int = 16
    max_streams: int = 128
    workers: int = 4
    log_burst: int = 20
    log_rate: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0.0 if f.name == "log_rate" else 1 if f.type == "int" else 1e-3
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= low):
                raise ValueError(f"--{_flag(f.name)} must be a finite number >= {low}, got {value}")
        if self.max_streams_per_address > self.max_streams:
            raise ValueError("--max-streams-per-address cannot exceed --max-streams")


@dataclass(frozen=True)
class ServerTLS:
    """PEM files: the server's certificate chain and key; with ``client_ca``, every client must
    present a certificate that CA signed (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def load(self) -> tuple[bytes, bytes, bytes | None]:
        """(key, chain, client CA) as bytes, after Python's own TLS stack accepted them: gRPC
        would only say that it cannot bind."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"--tls-cert {self.cert} / --tls-key {self.key}: {err}") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as err:
                raise ValueError(f"--tls-client-ca {self.client_ca}: {err}") from None
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return self.key.read_bytes(), self.cert.read_bytes(), ca


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(host: str, tls: ServerTLS | None, insecure: bool) -> None:
    """Plain text is the default on loopback only; elsewhere it has to be asked for."""
    if tls is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"{host} is not a loopback address: pass --tls-cert and --tls-key, or --insecure "
            "to serve plain text to the network"
        )


_HELP = {
    "request_deadline": "seconds a Forward call may take in all",
    "idle_timeout": "seconds to wait for a client's next chunk (and a connection's handshake)",
    "max_streams_per_address": "Forward calls open at once from one client address",
    "max_streams": "Forward calls open at once in all",
    "workers": "threads that decode requests and run the nets",
    "log_burst": "rejected requests logged at once before the rate limit",
    "log_rate": "rejected requests logged per second after the burst",
}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The limit and TLS flags of the service (``serve`` of ``fedleak ensembler`` too)."""
    limits = p.add_argument_group("limits (a hostile client must not starve the service)")
    for f in fields(ServiceLimits):
        kind = int if f.type == "int" else float
        limits.add_argument(
            f"--{_flag(f.name)}",
            type=kind,
            default=f.default,
            metavar="N" if kind is int else "X",
            help=f"{_HELP[f.name]} (%(default)s)",
        )
    tls = p.add_argument_group("TLS (plain text by default, on loopback only)")
    tls.add_argument("--tls-cert", type=Path, help="the server's certificate chain (PEM)")
    tls.add_argument("--tls-key", type=Path, help="the server's private key (PEM)")
    tls.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA (PEM)"
    )
    tls.add_argument(
        "--insecure", action="store_true", help="allow plain text on a non-loopback address"
    )


def limits_from_args(args: argparse.Namespace) -> ServiceLimits:
    return ServiceLimits(**{f.name: getattr(args, f.name) for f in fields(ServiceLimits)})


def tls_from_args(args: argparse.Namespace) -> ServerTLS | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)


def to_argv(args: argparse.Namespace) -> list[str]:
    """The flags of ``add_arguments`` back as a command line, to hand on to the service."""
    argv = [f"--{_flag(f.name)}={getattr(args, f.name)}" for f in fields(ServiceLimits)]
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, name) is not None:
            argv.append(f"--{_flag(name)}={getattr(args, name)}")
    return argv + (["--insecure"] if args.insecure else [])
