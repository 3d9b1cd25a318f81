"""fedleak.certs: what `fedleak certs` writes, and the checks that name a bad file."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedleak import certs
from fedleak.certs import Bundle, CertError, Manifest, NodeCredentials, ServerTLS
from fedleak.errors import ConfigError

HOSTS = "superlink,localhost,10.0.0.5"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    out = tmp_path_factory.mktemp("certs") / "set"
    certs.generate(out, HOSTS, nodes=2, clients=["experimenter", "auditor"])
    return Bundle(out)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def usages(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_writes_every_file_private_keys_0600(bundle):
    root = bundle.root
    expected = {
        "ca.crt",
        "ca.key",
        "superlink.crt",
        "superlink.key",
        "services.crt",
        "services.key",
        "clients/experimenter.crt",
        "clients/experimenter.key",
        "clients/auditor.crt",
        "clients/auditor.key",
        "nodes/node-0",
        "nodes/node-0.pub",
        "nodes/node-1",
        "nodes/node-1.pub",
        "manifest.json",
    }
    written = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert written == expected
    for rel in expected:
        private = rel.endswith(".key") or rel in ("nodes/node-0", "nodes/node-1")
        assert mode(root / rel) == (0o600 if private else 0o644), rel
    assert mode(root) == mode(root / "nodes") == mode(root / "clients") == 0o700


def test_server_certificate_names_given_hosts_and_loopback(bundle):
    cert = load(bundle.root / "superlink.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink", "localhost"]
    # Addresses are IP SANs (a DNS SAN "10.0.0.5" would not match in TLS clients).
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert usages(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(load(bundle.ca))


def test_ca_and_client_certificates(bundle):
    ca = load(bundle.ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert_path, _ = bundle.client("experimenter")
    client = load(cert_path)
    assert usages(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client.subject.rfc4514_string() == "CN=experimenter,O=fedleak"  # the proxy's map
    client.verify_directly_issued_by(ca)
    days = (client.not_valid_after_utc - client.not_valid_before_utc).days
    assert days == certs.DEFAULT_DAYS  # plus the hour of backdating


def test_node_keys_load_with_flowers_own_readers(bundle):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    for i in range(2):
        public = certs.check_node_key(bundle.node_key(i))
        # What `flwr supernode register` would send for the .pub file equals the private key's.
        assert try_load_public_key(bundle.node_public_key(i)) == public_key_to_bytes(public)
        assert public.curve.name == "secp384r1"
    assert bundle.node_public_key(0).read_text() != bundle.node_public_key(1).read_text()


def test_manifest_lists_what_was_made(bundle):
    manifest = Manifest.load(bundle.root)
    raw = json.loads((bundle.root / "manifest.json").read_text())
    assert raw["hosts"] == ["superlink", "localhost", "10.0.0.5", "127.0.0.1", "::1"]
    assert manifest.nodes == 2 and manifest.clients == ["experimenter", "auditor"]
    superlink = manifest.item("superlink")
    assert superlink.fingerprint == load(bundle.root / "superlink.crt").fingerprint(
        certs.hashes.SHA256()
    ).hex(":")
    not_after = dt.datetime.fromisoformat(superlink.not_after)
    assert abs((not_after - dt.datetime.now(dt.UTC)).days - certs.DEFAULT_DAYS) <= 1
    assert manifest.item("node-1").files == {"key": "nodes/node-1", "public": "nodes/node-1.pub"}
    assert certs.check_bundle(bundle.root) == manifest
    assert certs.expiring(manifest) == []


def test_never_overwrites(bundle):
    before = {p: p.read_bytes() for p in bundle.root.rglob("*") if p.is_file()}
    with pytest.raises(CertError, match=r"ca\.crt already exists"):
        certs.generate(bundle.root, "localhost", nodes=1)
    assert {p: p.read_bytes() for p in bundle.root.rglob("*") if p.is_file()} == before


def test_one_existing_file_stops_everything_before_writing(tmp_path):
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "node-1").write_text("someone's key")
    with pytest.raises(CertError, match=r"nodes/node-1 already exists"):
        certs.generate(tmp_path, "localhost", nodes=2)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["node-1", "nodes"]


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ("superlink,bad host", "'bad host' is neither"),
        ("-leading.example", "neither an IP address nor a DNS name"),
        (" , ", "at least one host"),
    ],
)
def test_bad_hosts_one_line(tmp_path, hosts, message):
    with pytest.raises(ConfigError, match=message):
        certs.generate(tmp_path / "x", hosts, nodes=1)
    assert not (tmp_path / "x").exists()


def test_bad_counts_and_names(tmp_path):
    with pytest.raises(ConfigError, match="--nodes"):
        certs.generate(tmp_path / "x", "localhost", nodes=-1)
    with pytest.raises(ConfigError, match="--clients"):
        certs.generate(tmp_path / "x", "localhost", nodes=1, clients=["Bad Name"])
    assert certs.parse_hosts("A.example.,a.example,[::1]") == ["a.example", "::1"]


def test_expired_set_names_the_file(tmp_path):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    certs.generate(tmp_path / "old", "localhost", nodes=1, days=30, start=past)
    old = Bundle(tmp_path / "old")
    with pytest.raises(CertError, match=r"old/ca\.crt: CA certificate expired on"):
        certs.check_bundle(old.root)
    with pytest.raises(CertError, match=r"old/superlink\.crt: server certificate expired"):
        ServerTLS.from_bundle(old.root).check()
    assert certs.expiring(Manifest.load(old.root)) == [
        "ca",
        "superlink",
        "services",
        "experimenter",
    ]


def test_wrong_ca_wrong_host_wrong_key(bundle, tmp_path):
    certs.generate(tmp_path / "other", "localhost", nodes=1)
    other = Bundle(tmp_path / "other")
    cert, key = bundle.server()
    with pytest.raises(CertError, match=rf"{cert}: server certificate was not issued by the CA"):
        certs.check_server(cert, key, other.ca)
    with pytest.raises(CertError, match="does not name evil.example"):
        certs.check_server(cert, key, bundle.ca, host="evil.example")
    certs.check_server(cert, key, bundle.ca, host="10.0.0.5")
    _, other_key = other.server()
    with pytest.raises(CertError, match=rf"{other_key}: private key does not belong to {cert}"):
        certs.check_key_pair(cert, other_key)
    with pytest.raises(CertError, match=r"missing\.crt: certificate not found"):
        certs.check_certificate(tmp_path / "missing.crt")
    with pytest.raises(CertError, match="not a PEM certificate"):
        certs.check_certificate(bundle.node_public_key(0))


def test_key_readable_by_others_refused(tmp_path):
    certs.generate(tmp_path / "s", "localhost", nodes=1)
    b = Bundle(tmp_path / "s")
    os.chmod(b.node_key(0), 0o644)
    with pytest.raises(CertError, match=r"node-0: private key is readable by others \(mode 0644\)"):
        NodeCredentials(ca=b.ca, key=b.node_key(0)).check()
    cert, key = b.server()
    os.chmod(key, 0o640)
    with pytest.raises(CertError, match="readable by others"):
        certs.check_key_pair(cert, key)


def test_node_key_must_be_openssh_ecdsa(bundle):
    _, x509_key = bundle.server()
    with pytest.raises(CertError, match="not an unencrypted OpenSSH private key"):
        certs.check_node_key(x509_key)


def _tls_server(tls: ServerTLS) -> tuple[socket.socket, threading.Thread]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_probe_tls_names_address_and_file(bundle, tmp_path):
    certs.generate(tmp_path / "other", "localhost", nodes=0)
    listener, thread = _tls_server(ServerTLS.from_bundle(bundle.root))
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        assert certs.probe_tls(address, bundle.ca) is True
        other_ca = Bundle(tmp_path / "other").ca
        with pytest.raises(CertError, match=rf"{address}: .* does not verify with {other_ca}"):
            certs.probe_tls(address, other_ca)
    finally:
        thread.join(timeout=5)
        listener.close()
    assert certs.probe_tls(address, bundle.ca, timeout=1) is False  # nothing listens now
    with pytest.raises(ConfigError, match="not HOST:PORT"):
        certs.probe_tls("superlink", bundle.ca)


def test_cli_entry(tmp_path, capsys):
    assert certs.main(["--out", str(tmp_path / "c"), "--hosts", "superlink", "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "superlink.crt, superlink.key for superlink, localhost, 127.0.0.1, ::1" in out
    assert "nodes/node-0, nodes/node-0.pub" in out
    assert certs.main(["--out", str(tmp_path / "c"), "--hosts", "superlink", "--nodes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err
