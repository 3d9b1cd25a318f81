"""The Ensembler service over TLS, with certificates made here (``cryptography``): a real server
process with ``--tls-cert/--tls-key`` (and ``--tls-client-ca`` for mutual TLS), clients that
trust its CA, and clients that do not, which must fail at once with an error that says why."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import ensembler_helpers as helpers
import grpc
import pytest
import torch
from ensembler_helpers import SHAPE, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedleak.clients.ensembler_client import EnsemblerError, RemoteEnsemble
from fedleak.clients.ensembler_tls import ClientTLS

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

bundles, reference = helpers.bundles, helpers.reference  # fixtures, used here by name
pytestmark = pytest.mark.integration

NAME = "ensembler.test"  # the only name the server's certificate holds


def _issue(directory: Path, name: str, issuer=None, *, ca: bool = False) -> tuple:
    """A key and a certificate for ``name`` (self-signed when ``issuer`` is None), as PEM files
    ``name.key``/``name.pem``; returns (key, certificate) for issuing more."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    signer_key, signer = issuer or (key, None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
        )
    cert = builder.sign(signer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem signs the server's and a client's certificate; rogue-ca.pem signs another."""
    d = tmp_path_factory.mktemp("pki")
    ca = _issue(d, "ca", ca=True)
    rogue = _issue(d, "rogue-ca", ca=True)
    _issue(d, NAME, ca)
    _issue(d, "client", ca)
    _issue(d, "rogue-client", rogue)
    return d


def tls_server(tmp_path_factory, bundle: Path, pki: Path, *extra: str) -> ServerProcess:
    tls = ["--tls-cert", str(pki / f"{NAME}.pem"), "--tls-key", str(pki / f"{NAME}.key")]
    return ServerProcess(tmp_path_factory.mktemp("tls-server"), bundle, *tls, *extra)


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles, pki):
    proc = tls_server(tmp_path_factory, bundles[0], pki)
    yield proc
    proc.stop_and_check()


@pytest.fixture(scope="module")
def mutual(tmp_path_factory, bundles, pki):
    proc = tls_server(tmp_path_factory, bundles[0], pki, "--tls-client-ca", str(pki / "ca.pem"))
    yield proc
    proc.stop_and_check()


def trusted(pki: Path, **fields) -> ClientTLS:
    return ClientTLS(**{"ca": pki / "ca.pem", "server_name": NAME, **fields})


def test_a_client_with_the_ca_is_served(server, pki, reference):
    x = torch.randn(2, *SHAPE)
    with RemoteEnsemble(server.address, tls=trusted(pki)) as remote:
        assert remote.describe()["model_version"] == "test-v1"
        torch.testing.assert_close(remote.forward(x), reference(x), rtol=1e-4, atol=1e-4)
        stub = health_pb2_grpc.HealthStub(remote._channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def refused(address: str, client: ClientTLS | None) -> str:
    """The error of a client that cannot connect: at once, although its deadline is far."""
    started = time.monotonic()
    with (
        RemoteEnsemble(address, tls=client, timeout=30) as remote,
        pytest.raises(EnsemblerError) as err,
    ):
        remote.describe()
    assert time.monotonic() - started < 5, "failed at once, not at the deadline"
    assert err.value.code == grpc.StatusCode.UNAVAILABLE, str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    ("client", "says"),
    [
        (None, "if it serves TLS, pass its CA (--tls-ca)"),
        (ClientTLS(server_name=NAME), "no CA this system trusts signed the server's certificate"),
        ("rogue-ca", "is not signed by the CA in"),
        ("no-override", "(--tls-server-name)"),
    ],
)
def test_a_client_that_cannot_check_the_server_fails_at_once(server, pki, client, says):
    if client == "rogue-ca":
        client = trusted(pki, ca=pki / "rogue-ca.pem")
    elif client == "no-override":
        client = trusted(pki, server_name=None)  # dials 127.0.0.1, the certificate says NAME
    assert says in refused(server.address, client)


def test_mutual_tls_serves_only_clients_with_a_certificate_from_the_ca(mutual, pki, reference):
    x = torch.randn(1, *SHAPE)
    mine = trusted(pki, cert=pki / "client.pem", key=pki / "client.key")
    with RemoteEnsemble(mutual.address, tls=mine) as remote:
        torch.testing.assert_close(remote.forward(x), reference(x), rtol=1e-4, atol=1e-4)
    strangers = [
        trusted(pki),  # no certificate at all
        trusted(pki, cert=pki / "rogue-client.pem", key=pki / "rogue-client.key"),
    ]
    for client in strangers:
        assert "(--tls-cert, --tls-key)" in refused(mutual.address, client)


def test_command_line_client_over_tls(server, bundles, pki, data_root, capsys):
    from fedleak.clients.ensembler_client import main

    args = ["--bundle", str(bundles[1]), "--server", server.address, "--images", "2"]
    args += ["--data-root", str(data_root), "--tls-ca", str(pki / "ca.pem")]
    assert main([*args, "--tls-server-name", NAME]) == 0
    assert capsys.readouterr().out.startswith("accuracy ")
    assert main(args) == 2  # the certificate does not hold 127.0.0.1
    assert "--tls-server-name" in capsys.readouterr().err


def test_bad_tls_files_are_refused_before_serving(bundles, pki, capsys):
    from fedleak.server.ensembler_service import main

    base = ["--bundle", str(bundles[0]), "--device", "cpu"]
    cert, key = str(pki / f"{NAME}.pem"), str(pki / f"{NAME}.key")
    cases = {
        "go together": ["--tls-cert", cert],
        "KEY_VALUES_MISMATCH": ["--tls-cert", cert, "--tls-key", str(pki / "client.key")],
        "--tls-client-ca": ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", key],
        "No such file": ["--tls-cert", cert + ".missing", "--tls-key", key],
        "--insecure": ["--host", "0.0.0.0"],
    }
    for says, args in cases.items():
        assert main([*base, *args]) == 2, says
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
