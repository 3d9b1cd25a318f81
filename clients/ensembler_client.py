"""The Ensembler client: head + noise locally, the N server nets remotely, selector + tail locally.

    python -m fedleak.clients.ensembler_client --bundle client.pt --server HOST:PORT --images 100
        [--tls-ca ca.pem [--tls-server-name NAME] [--tls-cert cert.pem --tls-key key.pem]]

classifies the first N CIFAR-10 test images and prints the accuracy. Only the noisy head
features cross the wire; the selector secret and the tail stay in this process.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Iterator

import grpc
import torch
from torch import Tensor

from fedleak.clients.ensembler_tls import ClientTLS, explain
from fedleak.clients.ensembler_tls import add_arguments as add_tls_arguments
from fedleak.clients.ensembler_tls import from_args as tls_from_args
from fedleak.models.ensembler import BundleError, ClientBundle, load_client_bundle
from fedleak.proto import ensembler_pb2 as pb
from fedleak.proto import ensembler_pb2_grpc as pb_grpc
from fedleak.proto import wire


class EnsemblerError(RuntimeError):
    """The server refused or failed a call, or answered something malformed."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class RemoteEnsemble:
    """A connection to an Ensembler server. ``timeout`` is the deadline of each RPC, in seconds;
    ``tls``: plain text when None.

    Nothing is retried: a failed call raises ``EnsemblerError`` with the gRPC status code (a
    failed TLS handshake fails the call at once, and the error says what was wrong).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
        tls: ClientTLS | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.tls = tls
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            options += tls.channel_options()
            self._channel = grpc.secure_channel(address, tls.credentials(), options=options)
        self._stub = pb_grpc.EnsemblerStub(self._channel)
        self._info: dict | None = None

    def __enter__(self) -> RemoteEnsemble:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _failed(self, method: str, err: grpc.RpcError) -> EnsemblerError:
        code = err.code() if isinstance(err, grpc.Call) else None
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        name = code.name if code else "UNKNOWN"
        hint = explain(details or "", self.tls) if code == grpc.StatusCode.UNAVAILABLE else None
        if hint:
            details = f"{hint} [gRPC: {details}]"
        return EnsemblerError(f"{self.address}: {method} failed: {name}: {details}", code)

    def describe(self) -> dict:
        """The server's ServerInfo as a dict (dtype names in lower case, shapes as tuples)."""
        try:
            info = self._stub.Describe(pb.DescribeRequest(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise self._failed("Describe", err) from None
        self._info = {
            "num_nets": info.num_nets,
            "input_shape": tuple(info.input_shape),
            "input_dtypes": [wire.dtype_name(d).lower() for d in info.input_dtypes],
            "model_version": info.model_version,
            "max_message_bytes": info.max_message_bytes,
            "max_batch": info.max_batch,
            "feature_dim": info.feature_dim,
            "output_dtype": wire.dtype_name(info.output_dtype).lower(),
        }
        return dict(self._info)

    def forward(self, features: Tensor) -> Tensor:
        """B x C x H x W features (float32 or float16 are sent as they are, other floats as
        float32) -> the N nets' outputs, N x B x feature_dim float32 on the CPU.

        Batches above the server's ``max_batch`` become several requests; each request is sent
        in as many messages as the smaller of both sides' message limits needs.
        """
        info = self._info or self.describe()
        if features.dim() != 4 or tuple(features.shape[1:]) != info["input_shape"]:
            raise ValueError(
                f"features must be B x {' x '.join(map(str, info['input_shape']))}, "
                f"got {tuple(features.shape)}"
            )
        if features.dtype not in (torch.float32, torch.float16):
            features = features.float()
        features = features.detach().cpu()
        step = info["max_batch"]
        outputs = [
            self._request(features[start : start + step], info)
            for start in range(0, features.shape[0], step)
        ]
        if not outputs:
            return torch.empty(info["num_nets"], 0, info["feature_dim"])
        return torch.cat(outputs, dim=1)

    def _chunks(
        self, features: Tensor, request_id: str, runs: list[tuple[int, int]]
    ) -> Iterator[pb.FeatureChunk]:
        # Encoded lazily: gRPC pulls this iterator from its own thread while earlier chunks fly.
        for index, (start, stop) in enumerate(runs):
            code, data = wire.encode(features[start:stop])
            yield pb.FeatureChunk(
                request_id=request_id,
                chunk_index=index,
                chunk_count=len(runs),
                batch_size=features.shape[0],
                shape=features[start:stop].shape,
                dtype=code,
                data=data,
                max_response_bytes=self.max_message_bytes,
            )

    def _request(self, features: Tensor, info: dict) -> Tensor:
        batch = features.shape[0]
        code = wire.dtype_code(features.dtype)
        limit = min(self.max_message_bytes, info["max_message_bytes"])
        runs = wire.split_batch(batch, wire.payload_bytes(features.shape[1:], code), limit)
        request_id = uuid.uuid4().hex
        out = torch.empty(info["num_nets"], batch, info["feature_dim"])
        filled = 0
        try:
            replies = self._stub.Forward(
                self._chunks(features, request_id, runs), timeout=self.timeout
            )
            for index, reply in enumerate(replies):
                samples = self._check_reply(reply, request_id, index, filled, out.shape)
                out[:, filled : filled + samples] = wire.decode(
                    reply.data, tuple(reply.shape), reply.dtype
                )
                filled += samples
        except grpc.RpcError as err:
            raise self._failed("Forward", err) from None
        if filled != batch:
            raise EnsemblerError(f"{self.address}: Forward answered {filled} of {batch} samples")
        return out

    def _check_reply(
        self, reply: pb.OutputChunk, request_id: str, index: int, filled: int, full: torch.Size
    ) -> int:
        shape = tuple(reply.shape)
        ok = (
            reply.request_id == request_id
            and reply.chunk_index == index
            and reply.batch_offset == filled
            and reply.dtype == pb.FLOAT32
            and len(shape) == 3
            and shape[0] == full[0]
            and shape[2] == full[2]
            and 1 <= shape[1] <= full[1] - filled
            and len(reply.data) == wire.payload_bytes(shape, pb.FLOAT32)
        )
        if not ok:
            raise EnsemblerError(
                f"{self.address}: malformed Forward reply {index} (shape {list(shape)}, "
                f"offset {reply.batch_offset}, {len(reply.data)} bytes)"
            )
        return shape[1]


def classify(
    client_bundle: ClientBundle, remote: RemoteEnsemble, images: Tensor, batch_size: int = 256
) -> Tensor:
    """Logits of ``images`` through the split pipeline (B x num_classes, CPU)."""
    info = remote.describe()
    if info["num_nets"] != client_bundle.num_nets:
        raise EnsemblerError(
            f"the server runs {info['num_nets']} nets, the client bundle expects "
            f"{client_bundle.num_nets}"
        )
    if info["model_version"] != client_bundle.server_version:
        raise EnsemblerError(
            f"the server's model version {info['model_version']!r} is not the client bundle's "
            f"{client_bundle.server_version!r}"
        )
    logits = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            features = client_bundle.encode(images[start : start + batch_size])
            logits.append(client_bundle.decode(remote.forward(features)))
    if not logits:
        return torch.empty(0, client_bundle.num_classes)
    return torch.cat(logits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedleak.clients.ensembler_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", required=True, help="client bundle (save_client_bundle)")
    p.add_argument("--server", required=True, help="HOST:PORT of the Ensembler server")
    p.add_argument("--images", type=int, default=100, help="first N CIFAR-10 test images")
    p.add_argument("--data-root", help="dataset root (default: $FEDLEAK_DATA_ROOT)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each RPC (s)")
    add_tls_arguments(p)
    args = p.parse_args(argv)

    from fedleak.data import load_dataset  # only the command line needs the datasets
    from fedleak.errors import FedleakError

    try:
        tls = tls_from_args(args)
        bundle = load_client_bundle(args.bundle)
        test = load_dataset("cifar10", "test", args.data_root)
        images, labels = test.images[: args.images], test.labels[: args.images]
        with RemoteEnsemble(args.server, timeout=args.timeout, tls=tls) as remote:
            logits = classify(bundle, remote, images, args.batch_size)
    except (BundleError, FedleakError, EnsemblerError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    correct = int((logits.argmax(1) == labels).sum())
    accuracy = correct / max(1, len(labels))
    print(f"accuracy {accuracy:.4f} ({correct}/{len(labels)} CIFAR-10 test images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
