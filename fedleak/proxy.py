"""The TLS reverse proxy (Debian's nginx) that stands in front of a SuperLink, and the
experimenter's sidecar that carries the flwr CLI's Control calls to it with a client certificate.

Why: Flower 1.42's open-source SuperLink serves its Fleet, Control and Runtime APIs on one port
and authenticates only Fleet callers (SuperNode keys). Its Control API has no account
authentication without Flower Enterprise, so anyone who reaches the port can register their own
node key, submit an app, read logs and stop runs; its Runtime API hands the ServerApp's task to
whoever asks first. deploy/SECURITY.md has the measurements. The templates live in deploy/nginx/.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import string
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedleak.certs import DEFAULT_CLIENTS, ServerTLS, split_address
from fedleak.errors import ConfigError, FedleakError
from fedleak.processes import Proc, ProcessGroup, tail

TEMPLATES = Path(__file__).resolve().parents[1] / "deploy" / "nginx"
PROXY_TEMPLATE = "superlink-proxy.conf.template"
SIDECAR_TEMPLATE = "experimenter-sidecar.conf.template"
TEMP_DIRS = ("body", "proxy", "fastcgi", "uwsgi", "scgi")


class _Template(string.Template):
    # nginx's own variables use $, so the placeholders are @{name}.
    delimiter = "@"


@dataclass(frozen=True)
class SuperLinkProxy:
    """The server side: public TLS listener in front of a SuperLink bound to loopback."""

    listen: str  # HOST:PORT the nodes and the experimenter's sidecar reach, e.g. 0.0.0.0:9093
    upstream: str  # the SuperLink's own HOST:PORT, on loopback or an internal network
    tls: ServerTLS  # the certificate the proxy presents, and the CA of client certificates
    control_clients: tuple[str, ...] = DEFAULT_CLIENTS  # client-certificate names for Control
    upstream_name: str = "localhost"  # the name checked in the SuperLink's certificate


@dataclass(frozen=True)
class ExperimenterSidecar:
    """The experimenter's side: plain HTTP on loopback in, mutual TLS to the proxy out."""

    listen: str  # 127.0.0.1:PORT, the address in the flwr connection
    remote: str  # HOST:PORT of the SuperLink's proxy
    client_cert: Path
    client_key: Path
    ca: Path
    # The name checked in the proxy's certificate; by default the host part of `remote`. nginx
    # matches DNS names only, so when `remote` is an IP address give a DNS name the certificate
    # carries (e.g. `superlink`).
    server_name: str = ""

    @property
    def verify_name(self) -> str:
        return self.server_name or split_address(self.remote)[0]


def _path(path: Path) -> str:
    text = str(Path(path).resolve())
    if any(c in text for c in '"\n;{}') or "@" in text:
        raise ConfigError(f"{text}: nginx paths may not contain quotes, ;, braces, @ or newlines")
    return text


def _render(template: str, values: dict[str, str]) -> str:
    try:
        text = (TEMPLATES / template).read_text()
    except OSError as err:
        raise FedleakError(
            f"{TEMPLATES / template}: not found; the proxy templates ship with the source "
            "checkout (deploy/nginx/)"
        ) from err
    try:
        return _Template(text).substitute(values)
    except (KeyError, ValueError) as err:
        raise FedleakError(f"{TEMPLATES / template}: bad placeholder ({err})") from err


def render_superlink_proxy(proxy: SuperLinkProxy, prefix: Path) -> str:
    for address in (proxy.listen, proxy.upstream):
        split_address(address)  # a one-line error when malformed
    allowed = "\n".join(
        f'        "SUCCESS:CN={name},O=fedleak" 1;' for name in proxy.control_clients
    )
    return _render(
        PROXY_TEMPLATE,
        {
            "prefix": _path(prefix),
            "listen": proxy.listen,
            "upstream": proxy.upstream,
            "upstream_name": proxy.upstream_name,
            "server_cert": _path(proxy.tls.cert),
            "server_key": _path(proxy.tls.key),
            "ca": _path(proxy.tls.ca),
            "control_map": allowed,
        },
    )


def render_experimenter_sidecar(sidecar: ExperimenterSidecar, prefix: Path) -> str:
    host, _ = split_address(sidecar.listen)
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(
            f"sidecar listen address {sidecar.listen}: loopback only, since whoever reaches it "
            "acts with the experimenter's certificate"
        )
    return _render(
        SIDECAR_TEMPLATE,
        {
            "prefix": _path(prefix),
            "listen": sidecar.listen,
            "remote": sidecar.remote,
            "server_name": sidecar.verify_name,
            "client_cert": _path(sidecar.client_cert),
            "client_key": _path(sidecar.client_key),
            "ca": _path(sidecar.ca),
        },
    )


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if not found:
        raise FedleakError("nginx not found: install Debian's package (apt-get install -y nginx)")
    return found


def write_config(config: str, prefix: Path) -> Path:
    """nginx.conf and the scratch folders nginx needs, all under `prefix` (no root needed)."""
    prefix = Path(prefix)
    for sub in TEMP_DIRS:
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(config)
    return conf


def start_nginx(procs: ProcessGroup, name: str, config: str, prefix: Path) -> Proc:
    """Check the configuration (`nginx -t`), then run nginx in the foreground in the group."""
    conf = write_config(config, prefix)
    cmd = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        lines = [ln for ln in check.stderr.splitlines() if "emerg" in ln or "error" in ln]
        raise FedleakError(f"{name}: nginx refused {conf}: {(lines or [check.stderr])[0]}")
    return procs.start(name, cmd, prefix / "nginx.log")


def wait_listening(proc: Proc, address: str, timeout: float = 30.0) -> None:
    host, port = split_address(address)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _fail_if_exited(proc)
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise FedleakError(f"{proc.name} did not listen on {address} within {timeout:.0f} s")


def wait_https_healthy(proc: Proc, url: str, ca: Path, timeout: float = 60.0) -> None:
    """Like the launcher's health wait, over HTTPS trusting only `ca`; names the URL on failure.
    A certificate that does not verify fails at once instead of timing out."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _fail_if_exited(proc)
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                if resp.status == 200:
                    return
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                raise FedleakError(
                    f"{url}: certificate does not verify with {ca}: {err.reason.verify_message}"
                ) from err
        except OSError:
            pass
        time.sleep(0.3)
    raise FedleakError(f"{proc.name}: {url} did not answer within {timeout:.0f} s")


def _fail_if_exited(proc: Proc) -> None:
    if proc.popen.poll() is not None:
        raise FedleakError(
            f"{proc.name} exited (code {proc.popen.returncode}): "
            f"{tail(proc.log, 3) or 'see ' + str(proc.log)}"
        )
