"""Container tests: the fedleak image and real containers, driven through the docker Python SDK.

Tests marked `containers` need a Docker engine. Without one they skip with the reason, except
under CI (`CI=true`), where a missing engine is a failure: CI promises that they ran.
The image is built once per session (`fedleak_image`); `.ci/docker-setup.sh` builds it first in
CI, so the session's build is a cache hit that re-copies only the source. Every container,
network and volume a test starts is removed when the test ends, also when it fails.

Environment: FEDLEAK_IMAGE (tag, default fedleak:dev), FEDLEAK_BASE_IMAGE (default: the official
python:3.11-slim when present or pullable, else the bootstrapped fedleak-base:bookworm).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("FEDLEAK_IMAGE", "fedleak:dev")
OFFICIAL_BASE = "python:3.11-slim"
LOCAL_BASE = "fedleak-base:bookworm"  # what .ci/docker-setup.sh bootstraps without a registry
# Every container a test starts outside compose carries this label, so cleanup finds it.
TEST_LABEL = "fedleak.tests"


def _engine_unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"container tests must run under CI, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        import docker
    except ImportError:
        _engine_unavailable("the docker Python SDK is not installed (pip install -e '.[dev]')")
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except docker.errors.DockerException as err:
        _engine_unavailable(f"no Docker engine answers ({err})")
    yield client
    client.close()


def _base_image(client: Any) -> str:
    wanted = os.environ.get("FEDLEAK_BASE_IMAGE")
    if wanted:
        return wanted
    import docker

    for name in (OFFICIAL_BASE, LOCAL_BASE):
        try:
            client.images.get(name)
            return name
        except docker.errors.ImageNotFound:
            continue
    return OFFICIAL_BASE  # the build pulls it


def _pip_sources() -> Any:
    """.ci/pip_sources.py, which serves this machine's wheels and CA bundle to the build."""
    spec = importlib.util.spec_from_file_location("pip_sources", REPO / ".ci" / "pip_sources.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    base: str
    seconds: float
    size_bytes: int


@pytest.fixture(scope="session")
def fedleak_image(docker_client: Any) -> BuiltImage:
    """The project image, built once per session from this checkout (cached layers reused)."""
    import docker

    sources = _pip_sources()
    local = sources.read_pip_sources()
    port = int(os.environ.get("FEDLEAK_PIP_PORT", 0)) or sources.DEFAULT_PORT
    server = None if local.empty else sources.serve(local, port)
    base = _base_image(docker_client)
    previous = _image_id(docker_client, IMAGE)
    started = time.monotonic()
    try:
        image, _ = docker_client.images.build(
            path=str(REPO),
            dockerfile="deploy/Dockerfile",
            tag=IMAGE,
            buildargs={"BASE_IMAGE": base, **sources.build_args(local, port)},
            network_mode="host",  # reaches the loopback pip sources
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as err:
        lines = [str(c.get("stream") or c.get("error") or "").rstrip() for c in err.build_log]
        tail = "\n".join(line for line in lines if line)[-3000:]
        pytest.fail(f"building {IMAGE} from {base} failed: {err}\n{tail}", pytrace=False)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    built = BuiltImage(IMAGE, base, time.monotonic() - started, int(image.attrs["Size"]))
    if previous and previous != image.id:  # the old image's own top layers are garbage now
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(previous)
    _BUILT.append(built)
    return built


def _image_id(client: Any, tag: str) -> str | None:
    import docker

    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


_BUILT: list[BuiltImage] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for built in _BUILT:
        terminalreporter.write_line(
            f"container tests: image {built.tag} from {built.base} built in {built.seconds:.0f} s"
            f" ({built.size_bytes / 1e9:.2f} GB)"
        )


def _compose_command() -> list[str]:
    """Compose v1 (`docker-compose`, Debian's 1.29 in CI) or the v2 plugin (`docker compose`)."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return ["docker", "compose"]
    _engine_unavailable("neither docker-compose nor the docker compose plugin is installed")
    raise AssertionError("unreachable")


@dataclass
class ComposeProject:
    """One compose project with a unique name; `down()` removes its containers, networks and
    volumes, and `leftovers()` says what is still there."""

    client: Any
    files: list[Path]
    env: dict[str, str]
    name: str = field(default_factory=lambda: f"fedleaktest{uuid.uuid4().hex[:8]}")

    def command(self, *args: str) -> list[str]:
        files = [a for f in self.files for a in ("-f", str(f))]
        return [*_compose_command(), "-p", self.name, *files, *args]

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A compose command; its output (stdout and stderr together) in `.stdout`."""
        return subprocess.run(
            self.command(*args),
            env={**os.environ, **self.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, *args: str) -> None:
        """`up --detach`: for tests that stop or restart containers mid-run. (`up
        --exit-code-from` would end the whole project at the first container that stops,
        a restart included.)"""
        result = self.run("up", "--detach", "--no-build", *args, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:]

    def wait(self, service: str, timeout: float) -> int:
        """The exit code of the service's container, once it has ended."""
        return int(self.container(service).wait(timeout=timeout)["StatusCode"])

    def container(self, service: str) -> Any:
        found = self.client.containers.list(all=True, filters=self._filter(service))
        if not found:
            raise LookupError(f"no container for service {service} in project {self.name}")
        return found[0]

    def _filter(self, service: str | None = None) -> dict[str, list[str]]:
        labels = [f"com.docker.compose.project={self.name}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return {"label": labels}

    def down(self) -> None:
        # The last lines of every service, for the report of a failed test (pytest shows a
        # passing test's output to nobody).
        print(self.run("logs", "--no-color", "--tail", "40", timeout=60).stdout[-12000:])
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=180)
        # Whatever compose could not remove (a failed `up`, a killed compose), the SDK removes.
        for c in self.client.containers.list(all=True, filters=self._filter()):
            c.remove(force=True, v=True)
        for n in self.client.networks.list(filters=self._filter()):
            n.remove()
        for v in self.client.volumes.list(filters=self._filter()):
            v.remove(force=True)

    def leftovers(self) -> list[str]:
        mine = self._filter()
        found = [f"container {c.name}" for c in self.client.containers.list(all=True, filters=mine)]
        found += [f"network {n.name}" for n in self.client.networks.list(filters=mine)]
        found += [f"volume {v.name}" for v in self.client.volumes.list(filters=mine)]
        return found


@pytest.fixture
def compose(docker_client: Any) -> Iterator[Any]:
    """compose(file, ..., env={...}) -> a ComposeProject, taken down when the test ends."""
    projects: list[ComposeProject] = []

    def make(*files: str | Path, env: dict[str, str] | None = None) -> ComposeProject:
        paths = [f if Path(f).is_absolute() else REPO / f for f in map(Path, files)]
        project = ComposeProject(docker_client, paths, dict(env or {}))
        projects.append(project)
        return project

    yield make
    for project in projects:
        project.down()
    left = [item for project in projects for item in project.leftovers()]
    assert not left, f"left behind after the test: {left}"


@pytest.fixture
def start_container(docker_client: Any) -> Iterator[Any]:
    """start_container(image, **containers.run kwargs) -> a detached container, removed (with
    its anonymous volumes) when the test ends, also when it fails."""
    started: list[Any] = []

    def start(image: str, **kwargs: Any) -> Any:
        labels = {**kwargs.pop("labels", {}), TEST_LABEL: "1"}
        c = docker_client.containers.run(image, detach=True, labels=labels, **kwargs)
        started.append(c)
        return c

    yield start
    for c in started:
        c.remove(force=True, v=True)


@pytest.fixture(scope="session", autouse=True)
def _no_test_containers_left() -> Iterator[None]:
    """After the session: no container started by these tests is still there."""
    yield
    try:
        import docker

        client = docker.from_env()
        left = client.containers.list(all=True, filters={"label": TEST_LABEL})
    except Exception:  # no SDK or no engine: nothing can be left
        return
    for c in left:
        c.remove(force=True, v=True)
    assert not left, f"containers left running by the tests: {[c.name for c in left]}"
