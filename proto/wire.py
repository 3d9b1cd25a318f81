"""Tensors on the wire: dtype codes, raw little-endian payloads, and how a batch is chunked.

Shared by the Ensembler server and client so both sides agree on every byte.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import Tensor

from fedleak.proto import ensembler_pb2 as pb

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's own default receive limit
# Room for a chunk's fields other than the payload (id <= 128 bytes, a few varints, tags).
HEADER_ALLOWANCE = 1024
REQUEST_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")

# Explicit little-endian numpy types: the payload's byte order must not depend on the host.
_NUMPY = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2")}
_TORCH = {pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16}
_CODES = {v: k for k, v in _TORCH.items()}


def dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else f"unknown dtype {code}"


def dtype_code(dtype: torch.dtype) -> int:
    """The wire code of a torch dtype; only float32 and float16 have one."""
    if dtype not in _CODES:
        raise ValueError(f"no wire encoding for {dtype}; send float32 or float16")
    return _CODES[dtype]


def itemsize(code: int) -> int:
    return _NUMPY[code].itemsize


def encode(tensor: Tensor) -> tuple[int, bytes]:
    """(dtype code, C-contiguous little-endian bytes) of a CPU or GPU tensor."""
    code = dtype_code(tensor.dtype)
    array = tensor.detach().cpu().contiguous().numpy()
    return code, array.astype(_NUMPY[code], copy=False).tobytes()


def decode(data: bytes, shape: tuple[int, ...], code: int) -> Tensor:
    """A writable tensor of ``shape``; the caller has checked ``len(data)`` already."""
    array = np.frombuffer(data, dtype=_NUMPY[code]).reshape(shape)
    # The copy makes it writable and native-endian; numpy's own view of `bytes` is read-only.
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


def payload_bytes(shape: tuple[int, ...] | list[int], code: int) -> int:
    return math.prod(shape) * itemsize(code)


def split_batch(batch: int, sample_bytes: int, max_message_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) runs of whole samples, as even as possible, each fitting one message."""
    per_message = (max_message_bytes - HEADER_ALLOWANCE) // sample_bytes
    if per_message < 1:
        raise ValueError(
            f"one sample ({sample_bytes} bytes) does not fit a {max_message_bytes}-byte message"
        )
    count = max(1, math.ceil(batch / per_message))
    bounds = [i * batch // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
