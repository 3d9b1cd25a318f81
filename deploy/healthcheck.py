"""Container health probes for the long-running roles; exit 0 when healthy, 1 with one line if not.

    python /app/deploy/healthcheck.py superlink [HOST:]PORT   # GET /health on its HTTP port
    python /app/deploy/healthcheck.py ensembler [HOST:]PORT   # the standard gRPC health service
    ... --ca CA.crt [--name NAME]                             # the same over TLS

Kept to what the image already has (urllib, grpcio-health-checking) and imports nothing from
fedleak, so a probe costs a fraction of a second and never loads torch.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def _address(text: str) -> str:
    return text if ":" in text else f"127.0.0.1:{text}"


def superlink(address: str, timeout: float, ca: str = "", name: str = "") -> str | None:
    """None when healthy, else what is wrong."""
    context = None
    if ca:
        import ssl

        context = ssl.create_default_context(cafile=ca)
        if name:  # the certificate names the service, not 127.0.0.1
            address = f"{name}:{address.rsplit(':', 1)[1]}"
    url = f"{'https' if ca else 'http'}://{address}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return None if resp.status == 200 else f"{url} answered {resp.status}"
    except (urllib.error.URLError, OSError) as err:
        return f"{url}: {getattr(err, 'reason', err)}"


def ensembler(address: str, timeout: float, ca: str = "", name: str = "") -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ca:
        with open(ca, "rb") as fh:
            creds = grpc.ssl_channel_credentials(fh.read())
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as err:
            return f"{address}: {err.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


PROBES = {"superlink": superlink, "ensembler": ensembler}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="probe a fedleak service")
    parser.add_argument("service", choices=sorted(PROBES))
    parser.add_argument("address", help="[HOST:]PORT (host defaults to 127.0.0.1)")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--ca", default="", help="probe over TLS, trusting this CA")
    parser.add_argument("--name", default="", help="the name the TLS certificate carries")
    args = parser.parse_args(argv)
    problem = PROBES[args.service](_address(args.address), args.timeout, args.ca, args.name)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
