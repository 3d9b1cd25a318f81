"""The run folder: every result a run produces, written so that a killed run stays readable.

Every write is either an atomic replace (temporary file in the same directory, fsync,
``os.replace``) or an append of one complete JSON line followed by flush + fsync, so a reader
never sees a half-written JSON document and at worst loses the torn last line of a ``.jsonl``.

Layout (all names relative to the run folder)::

    config.json          resolved settings (as a preset would spell them)
    meta.json            kind, preset, seed, versions, device, status, started/finished, message
    inbox/               what the roles sent (federated runs), one .npz per record
    metrics.jsonl        one line per server round
    attack.jsonl         one line per scored sample set
    inversion.jsonl      one line per scored reconstruction
    samples/, grids/, plots/, logs/
    report.html

Every command (``run``, ``study``, ``ensembler run``) goes through :func:`open_run`, the one
lifecycle: config and meta first, a status from :class:`Status` at every exit, the report last.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedleak.errors import Terminated

CONFIG = "config.json"
META = "meta.json"
METRICS = "metrics.jsonl"
ATTACK = "attack.jsonl"
REPORT = "report.html"
INVERSION = "inversion.jsonl"
SERVER_ATTACK_DIR = "server-attack"  # the curious server's reconstructions
SUBDIRS = ("samples", "grids", "plots", "logs")


class Status(enum.StrEnum):
    """How a run ended (or that it has not yet)."""

    RUNNING = "running"
    FINISHED = "finished"  # completed, results trustworthy
    DEGRADED = "degraded"  # completed, but something the results depend on went wrong
    STOPPED = "stopped"  # stopped on purpose: Ctrl-C or the wall-time budget
    FAILED = "failed"  # did not complete, or its results cannot be trusted

    @property
    def ok(self) -> bool:
        """Whether the exit code says success."""
        return self in (Status.FINISHED, Status.STOPPED)


_VERSION_PACKAGES = ("fedleak", "flwr", "torch", "torchvision", "numpy")
# One lock per process for appends and meta merges; fcntl covers other processes.
_LOCK = threading.Lock()


def now_iso() -> str:
    """Local time with its UTC offset, so a reader in another time zone is not misled."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _timestamp() -> str:
    # A function of its own so tests can pin the clock.
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types only; NaN/inf become None because strict JSON has no spelling for them."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy / torch scalars and arrays
    if callable(tolist):
        return to_jsonable(tolist())
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` with :func:`atomic_write_bytes`'s guarantee: a killed writer never leaves
    a half-written file that a later reader (a cache, a scorer) would trust."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def parse_jsonl(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(records, number of unreadable lines). A missing file is an empty log."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return [], 0
    records: list[dict] = []
    skipped = 0
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            skipped += 1
    return records, skipped


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise read-modify-write of meta.json across threads and processes."""
    with _LOCK:
        try:
            import fcntl
        except ImportError:  # not POSIX: the thread lock is all we have
            yield
            return
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class RunFolder:
    """One run's results directory; see the module docstring for the layout."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        for sub in SUBDIRS:
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def create(cls, base: str | os.PathLike, name: str) -> RunFolder:
        """A fresh folder ``base/<YYYYmmdd-HHMMSS>-<name>``, suffixed ``-2``, ``-3``... if taken."""
        base = Path(base)
        base.mkdir(parents=True, exist_ok=True)
        # Preset names end up in a path; keep them to characters every filesystem accepts.
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
        stem = f"{_timestamp()}-{safe}"
        for n in range(1, 10_000):
            candidate = base / (stem if n == 1 else f"{stem}-{n}")
            try:
                candidate.mkdir()  # exclusive: two launchers in the same second get distinct dirs
            except FileExistsError:
                continue
            return cls(candidate)
        raise FileExistsError(f"no free run folder name for {stem!r} in {base}")

    def file(self, relname: str) -> Path:
        return self.path / relname

    def sample_path(self, round_: int) -> Path:
        return self.path / "samples" / f"round-{round_:04d}.png"

    def figure6_path(self, round_: int) -> Path:
        return self.path / "grids" / f"figure6-round-{round_:04d}.png"

    def write_json(self, relname: str, obj: Any) -> Path:
        # Serialise first so a bad object never touches the file system.
        text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
        return atomic_write_text(self.path / relname, text)

    def read_json(self, relname: str, default: Any = None) -> Any:
        """The parsed file, or ``default`` when it is missing or unreadable."""
        try:
            return json.loads((self.path / relname).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return default

    def append_jsonl(self, relname: str, record: dict) -> None:
        if not isinstance(record, dict):
            raise TypeError(f"a JSONL record must be a dict, not {type(record).__name__}")
        data = (json.dumps(to_jsonable(record), allow_nan=False) + "\n").encode("utf-8")
        path = self.path / relname
        path.parent.mkdir(parents=True, exist_ok=True)
        with _LOCK:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                # A previous writer killed mid-line left no newline; without this the new,
                # complete record would be glued to the torn one and lost with it.
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

    def read_jsonl(self, relname: str) -> list[dict]:
        """Complete records only: a torn or corrupt line is skipped, never raised."""
        return parse_jsonl(self.path / relname)[0]

    def read_jsonl_checked(self, relname: str) -> tuple[list[dict], int]:
        """Like ``read_jsonl`` but also says how many lines were unreadable."""
        return parse_jsonl(self.path / relname)

    def write_meta(self, **fields: Any) -> None:
        """Merge ``fields`` into meta.json (atomic; concurrent writers do not lose keys)."""
        with _dir_lock(self.path):
            meta = self.read_json(META, {})
            if not isinstance(meta, dict):
                meta = {}
            meta.update(fields)
            self.write_json(META, meta)

    @staticmethod
    def versions() -> dict[str, str | None]:
        out: dict[str, str | None] = {
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
        for pkg in _VERSION_PACKAGES:
            try:
                out[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                out[pkg] = None
        return out


# --- the run lifecycle ------------------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): tells a live launcher
    from a later process that reused its pid. None where /proc is not there or pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def launcher_identity() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}


def launcher_lost(meta: dict[str, Any]) -> bool:
    """A run still 'running' whose launcher, on this host, no longer exists."""
    who = meta.get("launcher")
    if meta.get("status") != Status.RUNNING or not isinstance(who, dict):
        return False
    if who.get("host") != socket.gethostname() or not isinstance(who.get("pid"), int):
        return False  # another machine's launcher: nothing to check from here
    return process_start(who["pid"]) != who.get("start")


def reconcile(run: RunFolder) -> bool:
    """Mark a run whose launcher vanished (SIGKILL, a crash of the machine) as failed.
    Returns whether it did."""
    meta = run.read_json(META, {})
    if not isinstance(meta, dict) or not launcher_lost(meta):
        return False
    run.write_meta(
        status=Status.FAILED,
        message="launcher lost: the process that ran this run ended without recording how",
        finished=meta.get("finished") or now_iso(),
    )
    return True


@dataclass
class Outcome:
    """How the body of :func:`open_run` ended; it may set these before returning."""

    status: Status = Status.FINISHED
    message: str = ""


@contextlib.contextmanager
def open_run(
    base: str | os.PathLike,
    name: str,
    *,
    kind: str,
    config: dict[str, Any],
    meta: dict[str, Any],
    report: Callable[[Path], Any],
) -> Iterator[tuple[RunFolder, Outcome]]:
    """Create a run folder and keep it truthful whatever happens inside the ``with`` block.

    Writes ``config.json`` and ``meta.json`` (kind, seed, versions, launcher, status running)
    first; on exit records the status (the body's :class:`Outcome`; ``stopped`` on Ctrl-C;
    ``failed`` with the error on an exception), the end time and the wall time, then writes the
    report with ``report(path)``. Exceptions propagate after they are recorded.
    """
    run = RunFolder.create(base, name)
    run.write_json(CONFIG, config)
    run.write_meta(
        kind=kind,
        status=Status.RUNNING,
        started=now_iso(),
        versions=RunFolder.versions(),
        command=sys.argv,
        launcher=launcher_identity(),
        **meta,
    )
    outcome = Outcome()
    started = time.monotonic()
    try:
        yield run, outcome
    except KeyboardInterrupt as err:
        how = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
        outcome.status, outcome.message = Status.STOPPED, f"stopped by {how}"
        raise
    except BaseException as err:
        outcome.status, outcome.message = Status.FAILED, f"{type(err).__name__}: {err}"
        run.write_meta(traceback=traceback.format_exc())
        raise
    finally:
        run.write_meta(
            status=outcome.status,
            message=outcome.message,
            finished=now_iso(),
            wall_seconds=round(time.monotonic() - started, 1),
        )
        try:
            report(run.path)
        except Exception as err:  # the run's own outcome matters more than its report
            run.write_meta(report_error=f"{type(err).__name__}: {err}")
