"""The TLS reverse proxy (Debian's nginx) that stands in front of a SuperLink, and the
experimenter's sidecar that carries the flwr CLI's Control calls to it with a client certificate.

Why: Flower 1.42's open-source SuperLink serves its Fleet, Control and Runtime APIs on one port
and authenticates only Fleet callers (SuperNode keys). Its Control API has no account
authentication without Flower Enterprise, so anyone who reaches the port can register their own
node key, submit an app, read logs and stop runs; its Runtime API hands the ServerApp's task to
whoever asks first. deploy/SECURITY.md has the measurements. The templates live in
fedleak/federation/nginx/.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import ssl
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedleak.certs import DEFAULT_CLIENTS, Bundle, ServerTLS, ip_address_or_none, split_address
from fedleak.errors import ConfigError, FedleakError
from fedleak.federation.processes import Proc, ProcessGroup, tail

TEMPLATES = Path(__file__).resolve().parent / "nginx"  # package data
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
            f"{TEMPLATES / template}: not found; reinstall fedleak (the templates are package "
            "data of fedleak.federation)"
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
            "upstream_name": _dns_name(proxy.upstream_name, "proxy upstream name"),
            "server_cert": _path(proxy.tls.cert),
            "server_key": _path(proxy.tls.key),
            "ca": _path(proxy.tls.ca),
            "control_map": allowed,
        },
    )


def _dns_name(name: str, what: str) -> str:
    # Measured with nginx 1.22: proxy_ssl_name 127.0.0.1 fails ("upstream SSL certificate does
    # not match") even though the certificate carries that IP address.
    if ip_address_or_none(name) is not None:
        raise ConfigError(
            f"{what} {name}: nginx verifies DNS names only; give a DNS name that the "
            "certificate carries (fedleak certs always adds localhost and the --hosts names)"
        )
    return name


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
            "server_name": _dns_name(sidecar.verify_name, "sidecar server name"),
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


# ---------------------------------------------------------------------------------------------
# Command line: render a configuration for a long-running nginx (a service, a container).


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedleak proxy", description="Render the nginx configurations."
    )
    sub = parser.add_subparsers(dest="which", required=True)
    link = sub.add_parser("superlink", help="the proxy in front of the SuperLink (server host)")
    link.add_argument("--listen", default="0.0.0.0:9093", help="public HOST:PORT")
    link.add_argument("--upstream", default="127.0.0.1:9091", help="the SuperLink's HOST:PORT")
    link.add_argument("--control-clients", default=",".join(DEFAULT_CLIENTS))
    side = sub.add_parser("sidecar", help="the experimenter's sidecar (experimenter's machine)")
    side.add_argument("--listen", default="127.0.0.1:9095", help="loopback HOST:PORT for flwr")
    side.add_argument("--remote", required=True, help="the proxy's HOST:PORT")
    side.add_argument("--server-name", default="", help="DNS name to verify (default: host)")
    side.add_argument("--client", default=DEFAULT_CLIENTS[0], help="client certificate name")
    for p in (link, side):
        p.add_argument("--certs", type=Path, required=True, help="folder from fedleak certs")
        p.add_argument("--out", type=Path, required=True, help="nginx prefix folder to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    bundle = Bundle(args.certs)
    try:
        if args.which == "superlink":
            clients = tuple(c.strip() for c in args.control_clients.split(",") if c.strip())
            tls = ServerTLS.from_bundle(bundle.root)
            tls.check()
            proxy = SuperLinkProxy(args.listen, args.upstream, tls, clients)
            config = render_superlink_proxy(proxy, args.out)
        else:
            cert, key = bundle.client(args.client)
            sidecar = ExperimenterSidecar(
                args.listen, args.remote, cert, key, bundle.ca, args.server_name
            )
            config = render_experimenter_sidecar(sidecar, args.out)
        conf = write_config(config, args.out)
    except FedleakError as err:
        print(f"fedleak proxy: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {conf}; run: nginx -p {args.out} -c {conf} -e {args.out}/error.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
