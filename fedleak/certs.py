"""Certificates and keys for a federation spread over several machines: one command makes them all.

`generate` writes, with the `cryptography` package (no hand-written crypto, no openssl):

    ca.crt, ca.key             a private CA; ca.crt goes to every node, the proxy, the experimenter
    superlink.crt/.key         the SuperLink's (and its proxy's) server certificate: the given hosts
                               plus loopback, which Flower's own SuperExec dials (see LOOPBACK)
    services.crt/.key          server certificate for fedleak's gRPC services (Ensembler, collector)
    clients/NAME.crt/.key      client certificates (the experimenter's, for the Control API proxy)
    nodes/node-I, node-I.pub   one ECDSA P-384 key pair per SuperNode in OpenSSH format, as
                               `flower-supernode --auth-supernode-private-key` and
                               `flwr supernode register` read them
    manifest.json              what was generated, for which hosts, fingerprints and expiry dates

Private keys are created 0600 (the folders 0700) and nothing is ever overwritten. The `check_*`
functions validate files before a process uses them and fail in one line naming the file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedleak.errors import ConfigError, FedleakError

MANIFEST = "manifest.json"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SUPERLINK = "superlink"
SERVICES = "services"
CLIENTS_DIR, NODES_DIR = "clients", "nodes"
DEFAULT_CLIENTS = ("experimenter",)
DEFAULT_DAYS = 365
# Flower's SuperLink starts its SuperExec against its own bind address (0.0.0.0 becomes
# 127.0.0.1) and verifies the server name there, so a SuperLink certificate without the loopback
# names breaks the ServerApp. The same holds for a proxy or service reached on loopback.
LOOPBACK = ("localhost", "127.0.0.1", "::1")
# Flower's docs use `ssh-keygen -t ecdsa -b 384`; `flwr supernode register` accepts NIST curves.
NODE_CURVE = ec.SECP384R1()
X509_CURVE = ec.SECP256R1()
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# A certificate that ends within this many days gets a warning from check_certificate's callers.
SOON_DAYS = 14


class CertError(FedleakError):
    """A certificate or key file is missing, expired, malformed or does not match."""


@dataclass(frozen=True)
class Issued:
    """One generated item, as the manifest records it (paths relative to the folder)."""

    kind: str  # "ca", "server", "client" or "node-key"
    name: str
    files: dict[str, str]
    fingerprint: str  # sha256 of the DER certificate, or of the OpenSSH public key blob
    not_after: str | None = None
    hosts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Manifest:
    created: str
    hosts: list[str]
    nodes: int
    clients: list[str]
    valid_days: int
    items: list[Issued]
    generator: str = "fedleak.certs (cryptography)"

    def item(self, name: str) -> Issued:
        for it in self.items:
            if it.name == name:
                return it
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        try:
            raw = json.loads(path.read_text())
            return cls(**{**raw, "items": [Issued(**it) for it in raw["items"]]})
        except FileNotFoundError as err:
            raise CertError(f"{path}: not found (generate it with `fedleak certs`)") from err
        except (ValueError, TypeError, KeyError) as err:
            raise CertError(f"{path}: not a fedleak certificate manifest ({err})") from err


@dataclass(frozen=True)
class Bundle:
    """Where a generated folder's files are; what launchers and the proxy config need."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / CA_CERT

    def server(self, name: str = SUPERLINK) -> tuple[Path, Path]:
        return self.root / f"{name}.crt", self.root / f"{name}.key"

    def client(self, name: str) -> tuple[Path, Path]:
        return self.root / CLIENTS_DIR / f"{name}.crt", self.root / CLIENTS_DIR / f"{name}.key"

    def node_key(self, index: int) -> Path:
        return self.root / NODES_DIR / f"node-{index}"

    def node_public_key(self, index: int) -> Path:
        return self.root / NODES_DIR / f"node-{index}.pub"


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate, key and the CA its clients trust (SuperLink, proxy, services)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_bundle(cls, folder: Path, name: str = SUPERLINK) -> ServerTLS:
        cert, key = Bundle(Path(folder)).server(name)
        return cls(cert, key, Bundle(Path(folder)).ca)

    def check(self, host: str | None = None) -> None:
        check_server(self.cert, self.key, self.ca, host=host)


@dataclass(frozen=True)
class NodeCredentials:
    """What a SuperNode brings: the CA that verifies the SuperLink (None: the system's trust
    store, i.e. no private CA) and its node-authentication key (None: Flower's throwaway key,
    which a SuperLink with --enable-supernode-auth refuses)."""

    ca: Path | None = None
    key: Path | None = None

    def check(self) -> None:
        if self.ca is not None:
            check_certificate(self.ca, what="CA certificate")
        if self.key is not None:
            check_node_key(self.key)


# ---------------------------------------------------------------------------------------------
# Input


def parse_hosts(text: str | Sequence[str]) -> list[str]:
    """`superlink,localhost,10.0.0.5` -> validated names and addresses, in order, no repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    hosts: list[str] = []
    for raw in items:
        host = raw.strip().rstrip(".").lower()
        if not host:
            continue
        if (ip := ip_address_or_none(host)) is not None:
            host = str(ip)  # one spelling: [::1] and 0:0::1 are ::1
        elif not _is_dns_name(host):
            raise ConfigError(f"--hosts: {raw!r} is neither an IP address nor a DNS name")
        if host not in hosts:
            hosts.append(host)
    if not hosts:
        raise ConfigError("--hosts: give at least one host name or address of the SuperLink")
    return hosts


def ip_address_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _is_dns_name(host: str) -> bool:
    return len(host) <= 253 and all(_DNS_LABEL.match(label) for label in host.split("."))


def _names(names: Sequence[str], what: str) -> list[str]:
    for name in names:
        if not _NAME.match(name):
            raise ConfigError(f"{what}: {name!r} must be lower-case letters, digits, - or _")
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}: names repeat: {', '.join(names)}")
    return list(names)


# ---------------------------------------------------------------------------------------------
# Generation


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey, start, days: int
) -> x509.CertificateBuilder:
    # Backdated by an hour so a host whose clock is a little behind accepts a fresh certificate.
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _dt.timedelta(hours=1))
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    # ECDSA keys only sign; only the CA signs certificates (and would sign revocation lists).
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca(start: _dt.datetime, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(X509_CURVE)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedleak"),
            # A per-folder suffix: two deployments' CAs never look alike in a trust store.
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedleak CA {os.urandom(4).hex()}"),
        ]
    )
    cert = (
        _builder(name, name, key.public_key(), start, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    start: _dt.datetime,
    days: int,
    hosts: Sequence[str] = (),
    client: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(X509_CURVE)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedleak"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), start, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        sans: list[x509.GeneralName] = [
            x509.IPAddress(ip) if (ip := ip_address_or_none(h)) is not None else x509.DNSName(h)
            for h in hosts
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _node_key(comment: str) -> tuple[bytes, bytes, str]:
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    blob = public.split()[1]
    return private, public + f" {comment}\n".encode(), hashlib.sha256(blob).hexdigest()


def generate(
    out: Path,
    hosts: str | Sequence[str],
    nodes: int,
    clients: Sequence[str] = DEFAULT_CLIENTS,
    days: int = DEFAULT_DAYS,
    start: _dt.datetime | None = None,
) -> Manifest:
    """Write a complete set into `out` (created if needed). Refuses, before writing anything,
    when any target file exists. `start` pins the validity start (tests make expired sets)."""
    hosts = parse_hosts(hosts)
    clients = _names(list(clients), "--clients")
    if nodes < 0:
        raise ConfigError(f"--nodes must be 0 or more, not {nodes}")
    if days < 1:
        raise ConfigError(f"validity must be at least one day, not {days}")
    out = Path(out)
    start = start or _now()
    server_hosts = hosts + [h for h in LOOPBACK if h not in hosts]

    files: dict[str, tuple[bytes, int]] = {}  # relative path -> (content, mode)
    items: list[Issued] = []
    ca_key, ca_cert = _ca(start, days)
    files[CA_CERT] = (_pem_cert(ca_cert), 0o644)
    files[CA_KEY] = (_pem_key(ca_key), 0o600)
    items.append(_issued("ca", "ca", {"cert": CA_CERT, "key": CA_KEY}, ca_cert))
    for name in (SUPERLINK, SERVICES):
        key, cert = _leaf(ca_key, ca_cert, f"fedleak {name}", start, days, hosts=server_hosts)
        paths = {"cert": f"{name}.crt", "key": f"{name}.key"}
        files[paths["cert"]], files[paths["key"]] = (_pem_cert(cert), 0o644), (_pem_key(key), 0o600)
        items.append(_issued("server", name, paths, cert, server_hosts))
    for name in clients:
        key, cert = _leaf(ca_key, ca_cert, name, start, days, client=True)
        paths = {"cert": f"{CLIENTS_DIR}/{name}.crt", "key": f"{CLIENTS_DIR}/{name}.key"}
        files[paths["cert"]], files[paths["key"]] = (_pem_cert(cert), 0o644), (_pem_key(key), 0o600)
        items.append(_issued("client", name, paths, cert))
    for i in range(nodes):
        private, public, digest = _node_key(f"fedleak-node-{i}")
        paths = {"key": f"{NODES_DIR}/node-{i}", "public": f"{NODES_DIR}/node-{i}.pub"}
        files[paths["key"]], files[paths["public"]] = (private, 0o600), (public, 0o644)
        items.append(Issued("node-key", f"node-{i}", paths, digest))
    manifest = Manifest(
        created=start.isoformat(timespec="seconds"),
        hosts=server_hosts,
        nodes=nodes,
        clients=clients,
        valid_days=days,
        items=items,
    )
    files[MANIFEST] = (manifest.to_json().encode(), 0o644)
    _write_all(out, files)
    return manifest


def _issued(
    kind: str, name: str, paths: dict[str, str], cert: x509.Certificate, hosts=()
) -> Issued:
    return Issued(
        kind,
        name,
        paths,
        _fingerprint(cert),
        cert.not_valid_after_utc.isoformat(timespec="seconds"),
        list(hosts),
    )


def _write_all(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """All or nothing, never over an existing file: check every path first, then create each
    with O_EXCL; on a failure half-way, remove what this call created."""
    for rel in files:
        if (out / rel).exists():
            raise CertError(
                f"{out / rel} already exists; fedleak never overwrites keys or certificates: "
                "choose another --out or move the old files away"
            )
    created: list[Path] = []
    try:
        for folder in sorted({(out / rel).parent for rel in files}):
            if not folder.exists():
                folder.mkdir(mode=0o700, parents=True)
                created.append(folder)
        for rel, (content, mode) in files.items():
            path = out / rel
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            created.append(path)
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
            os.chmod(path, mode)  # the umask may have narrowed or (never) widened it
    except OSError as err:
        for path in reversed(created):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        raise CertError(f"cannot write {err.filename or out}: {err.strerror}") from err


# ---------------------------------------------------------------------------------------------
# Checks: one line naming the file


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as err:
        raise CertError(f"{path}: {what} not found") from err
    except OSError as err:
        raise CertError(f"{path}: cannot read {what}: {err.strerror}") from err


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise CertError(f"{path}: not a PEM {what}") from err


def check_certificate(
    path: Path,
    ca: Path | None = None,
    host: str | None = None,
    now: _dt.datetime | None = None,
    what: str = "certificate",
) -> x509.Certificate:
    """Valid now, issued by `ca` (when given), and naming `host` (when given)."""
    cert = load_certificate(path, what)
    now = now or _now()
    if now > cert.not_valid_after_utc:
        raise CertError(
            f"{path}: {what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "generate a new set with `fedleak certs`"
        )
    if now < cert.not_valid_before_utc:
        raise CertError(
            f"{path}: {what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(is this machine's clock right?)"
        )
    if ca is not None:
        issuer = check_certificate(ca, now=now, what="CA certificate")
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as err:
            raise CertError(f"{path}: {what} was not issued by the CA in {ca}") from err
    if host is not None and host.strip("[]") not in certificate_hosts(cert):
        raise CertError(
            f"{path}: {what} does not name {host} (it names "
            f"{', '.join(certificate_hosts(cert)) or 'no host'}); add it with "
            "`fedleak certs --hosts ...`"
        )
    return cert


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in sans.get_values_for_type(x509.DNSName)] + [
        str(v) for v in sans.get_values_for_type(x509.IPAddress)
    ]


def _check_private_file(path: Path) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise CertError(f"{path}: private key is readable by others (mode {mode:04o}); chmod 600")


def _private_key(path: Path, what: str, form: str, loader):
    data = _read(path, what)
    _check_private_file(path)
    try:
        return loader(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertError(f"{path}: not an unencrypted {form} private key") from err


def check_key_pair(cert_path: Path, key_path: Path) -> None:
    """The key file is private, parses, and belongs to the certificate."""
    key = _private_key(key_path, "private key", "PEM", serialization.load_pem_private_key)
    cert = load_certificate(cert_path)
    if key.public_key() != cert.public_key():
        raise CertError(f"{key_path}: private key does not belong to {cert_path}")


def check_server(
    cert: Path, key: Path, ca: Path, host: str | None = None, now: _dt.datetime | None = None
) -> None:
    check_certificate(cert, ca=ca, host=host, now=now, what="server certificate")
    check_key_pair(cert, key)


def check_node_key(path: Path) -> ec.EllipticCurvePublicKey:
    """An OpenSSH ECDSA private key on a NIST curve, readable by its owner only (what
    `flower-supernode --auth-supernode-private-key` needs); returns its public key."""
    key = _private_key(path, "SuperNode private key", "OpenSSH", serialization.load_ssh_private_key)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: SuperNode keys must be ECDSA (Flower refuses {type(key)})")
    return key.public_key()


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port), with a one-line error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def probe_tls(address: str, ca: Path, timeout: float = 5.0) -> bool:
    """One TLS handshake with `address`, trusting only `ca` and checking the server's name.
    True when it verifies, False when nothing answers (the caller's retry covers a SuperLink
    that starts later); a one-line CertError naming the address and the file when the server
    presents a certificate that `ca` does not vouch for, or that lacks the address's name."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return True
    except ssl.SSLCertVerificationError as err:
        raise CertError(
            f"{address}: the server's certificate does not verify with {ca} "
            f"({err.verify_message}); is it the CA of this deployment, and does the certificate "
            f"name {host}?"
        ) from err
    except ssl.SSLError as err:
        raise CertError(f"{address}: TLS handshake failed ({err.reason}); is it TLS?") from err
    except OSError:
        return False


def check_bundle(folder: Path, now: _dt.datetime | None = None) -> Manifest:
    """Every file the manifest lists: present, unexpired, issued by its CA, keys matching."""
    bundle, manifest = Bundle(Path(folder)), Manifest.load(Path(folder))
    for item in manifest.items:
        paths = {k: bundle.root / v for k, v in item.files.items()}
        if item.kind == "node-key":
            public = check_node_key(paths["key"])
            listed = serialization.load_ssh_public_key(_read(paths["public"], "public key"))
            if listed != public:
                raise CertError(f"{paths['public']}: does not match {paths['key']}")
            continue
        ca = None if item.kind == "ca" else bundle.ca
        what = "CA certificate" if item.kind == "ca" else f"{item.kind} certificate"
        check_certificate(paths["cert"], ca=ca, now=now, what=what)
        check_key_pair(paths["cert"], paths["key"])
    return manifest


def expiring(manifest: Manifest, days: int = SOON_DAYS) -> list[str]:
    """Names of the certificates that end within `days` days."""
    limit = _now() + _dt.timedelta(days=days)
    return [
        it.name
        for it in manifest.items
        if it.not_after and _dt.datetime.fromisoformat(it.not_after) < limit
    ]


# ---------------------------------------------------------------------------------------------
# Command line (`fedleak certs` wires add_arguments/run_cli; `python -m fedleak.certs` works too)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to create (never reused)")
    parser.add_argument(
        "--hosts",
        required=True,
        help="names and addresses that reach the SuperLink, comma-separated, "
        "e.g. superlink,localhost,10.0.0.5 (loopback is always added)",
    )
    parser.add_argument("--nodes", type=int, required=True, help="SuperNode key pairs to make")
    parser.add_argument(
        "--clients",
        default=",".join(DEFAULT_CLIENTS),
        help="client certificates for the Control API proxy (default: experimenter)",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")


def summary(manifest: Manifest, out: Path) -> str:
    lines = [f"fedleak certs: wrote {out} (valid {manifest.valid_days} days)"]
    for it in manifest.items:
        until = f", until {it.not_after[:10]}" if it.not_after else ""
        names = f" for {', '.join(it.hosts)}" if it.hosts else ""
        lines.append(f"  {it.kind:<8} {', '.join(it.files.values())}{names}{until}")
    lines.append(f"  manifest {out / MANIFEST}")
    lines.append("  keep ca.key offline; hand each node only ca.crt and its own nodes/node-I")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    manifest = generate(args.out, args.hosts, args.nodes, clients, days=args.days)
    print(summary(manifest, args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedleak certs", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run_cli(parser.parse_args(argv))
    except FedleakError as err:
        print(f"fedleak certs: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
