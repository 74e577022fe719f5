"""The service's `rtmdet` sub-commands: `serve` and `client` (registered in service/cli.py).

Heavy imports happen inside the commands, so `rtmdet --help` and `rtmdet detect` stay quick.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from model.config import SIZES


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve detection over HTTP and gRPC (flags override RTMDET_* settings)")
    p.add_argument("--host")
    p.add_argument("--http-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--weights", type=Path)
    p.add_argument("--size", choices=SIZES)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--model", action="append", metavar="NAME=PATH[,size=S][,img_size=N][,backend=B]",
                   help="serve this model under NAME (repeatable; the first is the default)")
    p.add_argument("--model-repository", type=Path, metavar="DIR",
                   help="serve every model in DIR/<model>/<version>/ (SIGHUP re-reads it)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="TLS certificate (chain) for HTTPS and gRPC")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                   help="demand client certificates signed by this CA (mTLS) on both protocols")
    p.add_argument("--health-port", type=int, help="a plain-text HTTP port for /healthz, /readyz and /metrics only")
    p.add_argument("--log-format", choices=("text", "json"))
    p.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from service.registry import parse_model_option
    from service.settings import ServiceSettings

    overrides = {k: v for k, v in {"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port,
                                   "weights": args.weights, "size": args.size, "device": args.device,
                                   "model_repository": getattr(args, "model_repository", None),
                                   "tls_cert_file": getattr(args, "tls_cert", None),
                                   "tls_key_file": getattr(args, "tls_key", None),
                                   "tls_client_ca_file": getattr(args, "tls_client_ca", None),
                                   "health_port": getattr(args, "health_port", None),
                                   "log_format": getattr(args, "log_format", None)}.items()
                 if v is not None}
    try:
        settings = ServiceSettings(**overrides)
        if getattr(args, "model", None):
            specs = [parse_model_option(text, settings) for text in args.model]
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"--model: each name once, got {names}")
            settings = settings.model_copy(update={"models": specs})
        return settings
    except ValidationError as exc:
        raise SystemExit(f"rtmdet serve: bad settings:\n{exc}") from None
    except ValueError as exc:
        raise SystemExit(f"rtmdet serve: error: {exc}") from None


def run_serve(args: argparse.Namespace) -> int:
    from service.server import run

    return run(settings_from_args(args))


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="send an image to a running `rtmdet serve` and print the JSON")
    p.add_argument("image", type=Path, nargs="?", help="the image (not needed with --list-models)")
    p.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    p.add_argument("--model", help="a served model's name (default: the server's default model)")
    p.add_argument("--list-models", action="store_true", help="print the served models instead of detecting")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL")
    p.add_argument("--target", default="127.0.0.1:50051", help="gRPC host:port")
    p.add_argument("--api-key", default=os.environ.get("RTMDET_API_KEY"))
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--max-detections", type=int)
    p.add_argument("--classes", nargs="*")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds")
    p.add_argument("--ca", type=Path, metavar="PEM", help="the CA that signed the server's certificate (TLS)")
    p.add_argument("--cert", type=Path, metavar="PEM", help="this client's certificate, for mTLS")
    p.add_argument("--key", type=Path, metavar="PEM", help="this client's private key, for mTLS")
    p.add_argument("--tls", action="store_true", help="gRPC over TLS with the system's roots (implied by --ca)")
    p.set_defaults(func=run_client)


def run_client(args: argparse.Namespace) -> int:
    params = dict(score_threshold=args.score_threshold, max_detections=args.max_detections, classes=args.classes,
                  model=args.model)
    if args.image is None and not args.list_models:
        print("error: give an image, or --list-models", file=sys.stderr)
        return 2

    def call(client):
        if args.list_models:
            from service.schemas import ModelInfo

            # Typed both ways: the HTTP JSON and the gRPC message read into the same ModelInfo.
            return [ModelInfo.model_validate(m).model_dump(mode="json") for m in client.models()]
        return client.detect(args.image, **params)

    try:
        if args.grpc:
            import grpc

            from service.client import GrpcDetectorClient
            try:
                with GrpcDetectorClient(args.target, api_key=args.api_key, timeout=args.timeout, ca=args.ca,
                                        cert=args.cert, key=args.key, tls=args.tls) as c:
                    result = call(c)
            except grpc.RpcError as exc:
                print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
        else:
            import httpx

            from service.client import HttpDetectorClient
            try:
                with HttpDetectorClient(args.url, api_key=args.api_key, timeout=args.timeout, ca=args.ca,
                                        cert=args.cert, key=args.key) as c:
                    result = call(c)
            except httpx.HTTPStatusError as exc:
                print(f"error: HTTP {exc.response.status_code}: {exc.response.text}", file=sys.stderr)
                return 1
            except httpx.HTTPError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
