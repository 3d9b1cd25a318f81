"""How the Ensembler client reaches a server that serves TLS: the trusted CA, the name the
server's certificate holds, a client certificate for servers that require one, the flags that
set them, and what a failed handshake means in words.

Imports neither torch nor grpc at module level, so ``fedleak ensembler classify`` can build
its parser from these flags cheaply.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ClientTLS:
    """``ca``: the server's CA (PEM; the system's roots when None). ``server_name``: the name
    the server's certificate must hold when it is not the host dialled. ``cert``/``key``: this
    client's certificate, for a server that requires one."""

    ca: Path | None = None
    server_name: str | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together")

    def credentials(self) -> Any:
        """gRPC channel credentials, after Python's own TLS stack accepted the files (gRPC
        would accept anything here and fail every call)."""
        import grpc

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            if self.ca is not None:
                context.load_verify_locations(cafile=self.ca)
            if self.cert is not None:
                context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as err:
            names = " / ".join(str(p) for p in (self.ca, self.cert, self.key) if p is not None)
            raise ValueError(f"TLS files {names}: {err}") from None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def explain(details: str, tls: ClientTLS | None) -> str | None:
    """What a failed connection's gRPC details say about TLS, in words; None if nothing."""
    if tls is None:
        if "Socket closed" in details or "Connection reset" in details:
            return (
                "the server closed the connection at once: if it serves TLS, pass its CA (--tls-ca)"
            )
        return None
    if "CERTIFICATE_VERIFY_FAILED" in details:
        if tls.ca is None:
            return (
                "TLS: no CA this system trusts signed the server's certificate; "
                "pass the server's CA (--tls-ca)"
            )
        return f"TLS: the server's certificate is not signed by the CA in {tls.ca} (--tls-ca)"
    if "Hostname Verification" in details or "server name" in details:
        return (
            "TLS: the server's certificate does not hold the name dialled; pass the name it "
            "holds (--tls-server-name)"
        )
    if "WRONG_VERSION_NUMBER" in details:
        return "TLS: the server does not speak TLS (connect without --tls-ca)"
    if "Socket closed" in details or "Connection reset" in details:
        # With TLS 1.3 the server checks a client's certificate after the client's side of the
        # handshake is done: all the client sees is the connection closing.
        return (
            "the server closed the connection during the TLS handshake: if it requires client "
            "certificates, pass one its CA signed (--tls-cert, --tls-key)"
        )
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (plain text unless one of these is given)")
    g.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    g.add_argument("--tls-ca", type=Path, help="TLS, trusting this CA (PEM)")
    g.add_argument("--tls-server-name", help="the name the server's certificate holds")
    g.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM)")
    g.add_argument("--tls-key", type=Path, help="this client's private key (PEM)")


def from_args(args: argparse.Namespace) -> ClientTLS | None:
    given = (args.tls_ca, args.tls_server_name, args.tls_cert, args.tls_key)
    if not args.tls and all(v is None for v in given):
        return None
    return ClientTLS(*given)
