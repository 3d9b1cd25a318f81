"""This machine's pip sources, served to a `docker build --network host` over loopback HTTP.

The image build cannot read the host's wheel folders (`pip config list`: find-links and
`file://` index URLs) nor, by default, trust the host's CA bundle that PyPI needs here. This
module serves those folders and the CA bundle on 127.0.0.1 and says which build arguments make
deploy/Dockerfile use them. The port is fixed (FEDLEAK_PIP_PORT) because the build arguments are
part of Docker's layer cache key: the same URLs on every build keep the torch layer cached.

Standard library only: it runs with the host's python3 before any virtualenv exists.

    python3 .ci/pip_sources.py serve       # serve until killed
    python3 .ci/pip_sources.py build-args  # print `--build-arg KEY=VALUE` pairs, one per line
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import posixpath
import re
import subprocess
import sys
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEFAULT_PORT = 38451
HOST = "127.0.0.1"


@dataclass(frozen=True)
class PipSources:
    """Where this machine's pip finds packages. Local folders are served; URLs pass through."""

    find_links: list[Path] = field(default_factory=list)
    indexes: list[Path] = field(default_factory=list)  # folders holding a PEP 503 simple index
    remote_find_links: list[str] = field(default_factory=list)
    remote_indexes: list[str] = field(default_factory=list)
    ca_bundle: Path | None = None

    @property
    def empty(self) -> bool:
        return not (self.find_links or self.indexes or self.ca_bundle)


def _pip_config() -> dict[str, str]:
    """`pip config list` as {key: value}; later scopes (env) override earlier ones."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    values: dict[str, str] = {}
    for line in out.splitlines():
        match = re.match(r"^[^.]*\.([\w-]+)='(.*)'$", line.strip())
        if match:
            values[match[1]] = match[2]
    return values


def _local_path(location: str) -> Path | None:
    if location.startswith("file://"):
        return Path(urllib.parse.urlparse(location).path)
    if location.startswith("/"):
        return Path(location)
    return None


def read_pip_sources() -> PipSources:
    config = _pip_config()
    find_links: list[Path] = []
    indexes: list[Path] = []
    remote_links: list[str] = []
    remote_indexes: list[str] = []
    for key, local, remote in (
        ("find-links", find_links, remote_links),
        ("extra-index-url", indexes, remote_indexes),
    ):
        for location in config.get(key, "").split():
            path = _local_path(location)
            if path is None:
                remote.append(location)
            elif path.is_dir() and path not in local:
                local.append(path)
    cert = config.get("cert") or os.environ.get("PIP_CERT", "")
    ca_bundle = Path(cert) if cert and Path(cert).is_file() else None
    return PipSources(find_links, indexes, remote_links, remote_indexes, ca_bundle)


def _routes(sources: PipSources) -> dict[str, Path]:
    """URL prefix -> local folder or file. An index is served from the folder above its
    `simple/` page tree, because its pages link to the wheels relatively (`../../files/...`)."""
    routes = {f"/find-links/{i}": p for i, p in enumerate(sources.find_links)}
    routes.update({f"/index/{i}": p.parent for i, p in enumerate(sources.indexes)})
    if sources.ca_bundle:
        routes["/ca-bundle.crt"] = sources.ca_bundle
    return routes


class _Handler(SimpleHTTPRequestHandler):
    routes: dict[str, Path] = {}

    def translate_path(self, path: str) -> str:
        path = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
        for prefix, target in self.routes.items():
            if path == prefix or path.startswith(prefix + "/"):
                rest = path[len(prefix) :].lstrip("/")
                return str(target / rest) if rest else str(target)
        return "/nonexistent"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base signature)
        pass  # pip fetches hundreds of pages; the build log shows what was installed


def serve(sources: PipSources, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; the caller calls shutdown() when the build is done."""
    handler = type("Handler", (_Handler,), {"routes": _routes(sources)})
    try:
        server = ThreadingHTTPServer((HOST, port), functools.partial(handler, directory="/"))
    except OSError as err:
        raise SystemExit(
            f"pip sources: cannot listen on {HOST}:{port} ({err.strerror}); "
            "set FEDLEAK_PIP_PORT to a free port"
        ) from err
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def build_args(sources: PipSources, port: int = DEFAULT_PORT) -> dict[str, str]:
    """deploy/Dockerfile's build arguments for these sources (none when there is nothing local)."""
    if sources.empty:
        return {}
    base = f"http://{HOST}:{port}"
    pip = [f"--find-links {base}/find-links/{i}/" for i in range(len(sources.find_links))]
    pip += [
        f"--extra-index-url {base}/index/{i}/{path.name}/" for i, path in enumerate(sources.indexes)
    ]
    pip += [f"--find-links {url}" for url in sources.remote_find_links]
    pip += [f"--extra-index-url {url}" for url in sources.remote_indexes]
    args = {"PIP_ARGS": " ".join([*pip, f"--trusted-host {HOST}"])}
    if sources.ca_bundle:
        args["CA_BUNDLE_URL"] = f"{base}/ca-bundle.crt"
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("serve", "build-args"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("FEDLEAK_PIP_PORT", 0)))
    args = parser.parse_args(argv)
    port = args.port or DEFAULT_PORT
    sources = read_pip_sources()
    if args.command == "build-args":
        for key, value in build_args(sources, port).items():
            print(f"--build-arg\n{key}={value}")
        return 0
    server = serve(sources, port)
    print(f"pip sources: serving {len(_routes(sources))} locations on {HOST}:{port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # SIGTERM (kill) ends the process outright
        threading.Event().wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
