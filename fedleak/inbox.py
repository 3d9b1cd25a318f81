"""The inbox: records the roles sent, one ``.npz`` file each, in arrival order.

The experimenter's collector writes here (``<run folder>/inbox/``); a role that cannot reach the
collector writes the same files into its own folder, to be handed over later. Each file holds the
record's arrays and, under ``__record__``, its JSON header (source, kind, id, fields). Loading
never unpickles: ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedleak.records import SENT_RECORDS, Record
from fedleak.runfolder import atomic_write_bytes

HEADER = "__record__"
INBOX = "inbox"
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Envelope:
    """A record as it travels: who sent it, which kind, a unique id, its parts."""

    source: str
    kind: str
    record_id: str
    fields: dict
    tensors: dict[str, np.ndarray]

    @classmethod
    def of(cls, source: str, record: Record, record_id: str) -> Envelope:
        return cls(source, record.kind, record_id, record.to_dict(), record.tensors())

    def record(self) -> Record:
        if self.kind not in SENT_RECORDS:
            raise ValueError(f"unknown record kind {self.kind!r}")
        return SENT_RECORDS[self.kind].from_parts(self.fields, self.tensors)


def file_name(envelope: Envelope) -> str:
    stem = "-".join(_SAFE.sub("_", p) for p in (envelope.source, envelope.kind))
    return f"{time.time_ns()}-{stem}-{_SAFE.sub('_', envelope.record_id)}.npz"


def write(folder: str | Path, envelope: Envelope) -> Path:
    header = {
        "source": envelope.source,
        "kind": envelope.kind,
        "record_id": envelope.record_id,
        "fields": envelope.fields,
    }
    arrays = dict(envelope.tensors)
    arrays[HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(Path(folder) / file_name(envelope), buffer.getvalue())


def read(path: str | Path) -> Envelope:
    """One inbox file; ValueError when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data[HEADER]).decode("utf-8"))
            tensors = {k: data[k] for k in data.files if k != HEADER}
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable inbox record: {err}") from err
    return Envelope(
        str(header["source"]),
        str(header["kind"]),
        str(header["record_id"]),
        dict(header["fields"]),
        tensors,
    )


def entries(folder: str | Path) -> Iterator[Path]:
    """The inbox's files in arrival order (a file being written is not listed yet)."""
    yield from sorted(Path(folder).glob("*.npz"))
