"""The service's `rtmdet` sub-commands: `serve` and `client` (registered in service/cli.py).

Heavy imports happen inside the commands, so `rtmdet --help` and `rtmdet detect` stay quick.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from model.cli_support import add_weights_key_argument, fraction, positive_float, positive_int
from model.config import CANVASES, SIZES


def add_serve(sub: argparse._SubParsersAction) -> None:
    from model.inference.modes import MODES
    from service.model_specs import MODEL_OPTION_SYNTAX

    p = sub.add_parser("serve", help="serve detection over HTTP and gRPC (flags override RTMDET_* settings)")
    p.add_argument("--host")
    p.add_argument("--http-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--weights", type=Path)
    p.add_argument("--size", choices=SIZES)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    add_weights_key_argument(p)
    p.add_argument("--model", action="append", metavar=MODEL_OPTION_SYNTAX,
                   help="serve this model under NAME (repeatable; the first is the default); accelerate: "
                        f"{'|'.join(MODES)}; auto_candidates: auto's field, e.g. eager+openvino; "
                        "latency_slo_ms: this model's RTMDET_LATENCY_SLO_MS")
    p.add_argument("--model-repository", type=Path, metavar="DIR",
                   help="serve every model in DIR/<model>/<version>/ (SIGHUP re-reads it)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="TLS certificate (chain) for HTTPS and gRPC")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                   help="demand client certificates signed by this CA (mTLS) on both protocols")
    p.add_argument("--health-port", type=int, help="a plain-text HTTP port for /healthz, /readyz and /metrics only")
    p.add_argument("--log-format", choices=("text", "json"))
    p.add_argument("--canvas", choices=CANVASES,
                   help="every model's letterbox canvas (RTMDET_CANVAS; a --model's canvas= wins): square, as the "
                        "official pipeline, or tight, padded only to a multiple of 32 (a 4:3 photo runs at 640 x 480)")
    p.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from model.errors import UserError
    from service.model_specs import parse_model_option
    from service.settings import ServiceSettings

    overrides = {k: v for k, v in {"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port,
                                   "weights": args.weights, "size": args.size, "device": args.device,
                                   "weights_key": getattr(args, "weights_key", None),
                                   "model_repository": getattr(args, "model_repository", None),
                                   "tls_cert_file": getattr(args, "tls_cert", None),
                                   "tls_key_file": getattr(args, "tls_key", None),
                                   "tls_client_ca_file": getattr(args, "tls_client_ca", None),
                                   "health_port": getattr(args, "health_port", None),
                                   "log_format": getattr(args, "log_format", None),
                                   "canvas": getattr(args, "canvas", None)}.items()
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
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))} (RTMDET_{str(e['loc'][0]).upper()} or its flag): "
                             f"{e['msg']} (got {e.get('input')!r})" for e in exc.errors())
        raise UserError(f"bad settings: {problems}") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None


def run_serve(args: argparse.Namespace) -> int:
    from service.serve_env import apply_thread_counts, ensure_before_torch

    ensure_before_torch()  # may re-exec this process
    settings = settings_from_args(args)  # before torch is imported: a bad setting is refused in a fraction of a second
    from model.inference.allocator import keep_freed_memory
    from service.server import run

    threads = apply_thread_counts(settings.torch_threads, settings.opencv_threads)
    # This process is the service's: activations reuse freed blocks (model.inference.allocator), unless told not to.
    if not settings.keep_freed_memory:
        malloc = "glibc's defaults (RTMDET_KEEP_FREED_MEMORY=false)"
    else:
        malloc = "keeps freed blocks" if keep_freed_memory() else "its defaults (not glibc, or mallopt refused)"
    print(f"rtmdet serve: {threads}; malloc: {malloc}", flush=True)
    return run(settings)


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="send images to a running `rtmdet serve`; one JSON line per image",
                       description="Sends images (files, folders, globs) to a running `rtmdet serve`, --concurrency "
                                   "at a time, and writes one JSON line per image, in input order: "
                                   '{"file": ..., "detections": [...]} or {"file": ..., "error": ..., "status": ...}. '
                                   "Exit code 1 if any image failed, 2 if the inputs are unusable.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders of images, or globs")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--grpc", action="store_true", help="same as --protocol grpc")
    p.add_argument("--model", help="a served model's name (default: the server's default model)")
    p.add_argument("--list-models", action="store_true", help="print the served models instead of detecting")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL")
    p.add_argument("--target", default="127.0.0.1:50051", help="gRPC host:port")
    p.add_argument("--api-key", default=os.environ.get("RTMDET_API_KEY"))
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight at once")
    p.add_argument("--score-threshold", type=fraction)
    p.add_argument("--max-detections", type=positive_int)
    p.add_argument("--classes", nargs="*")
    p.add_argument("--timeout", type=positive_float, default=60.0,
                   help="deadline per image in seconds, retries included")
    p.add_argument("--attempts", type=positive_int, default=5, help="tries per image when the server is overloaded")
    p.add_argument("--out", type=Path, help="write the JSON lines here instead of stdout")
    p.add_argument("--coco-results", type=Path, help="write a COCO results file (a JSON list of detections)")
    p.add_argument("--coco-ann", type=Path, help="COCO annotations whose file_name/id and categories give "
                                                 "image_id and category_id (default: running index, label + 1)")
    p.add_argument("--ca", type=Path, metavar="PEM", help="the CA that signed the server's certificate (TLS)")
    p.add_argument("--cert", type=Path, metavar="PEM", help="this client's certificate, for mTLS")
    p.add_argument("--key", type=Path, metavar="PEM", help="this client's private key, for mTLS")
    p.add_argument("--tls", action="store_true", help="gRPC over TLS with the system's roots (implied by --ca)")
    p.set_defaults(func=run_client)


def run_client(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.client import DetectorError
    from service.client_cli import CocoIds, InputError, expand_inputs, summary

    if args.list_models:
        return _list_models(args)
    try:
        if not args.inputs:
            raise InputError("give images (files, folders or globs), or --list-models")
        files = expand_inputs(args.inputs)
        coco = None
        if args.coco_results:
            coco = CocoIds.from_annotations(args.coco_ann, files) if args.coco_ann else CocoIds.numbered(files)
    except InputError as exc:
        print(f"rtmdet client: error: {exc}", file=sys.stderr)
        return 2
    client = _client(args)
    params = dict(score_threshold=args.score_threshold, max_detections=args.max_detections, classes=args.classes,
                  model=args.model)
    # JSON lines go to --out, else stdout unless the COCO file is the output asked for.
    lines = open(args.out, "w") if args.out else (None if coco else sys.stdout)  # noqa: SIM115 (closed below)
    failed, first_failure, coco_entries = 0, None, []
    try:
        with client:
            if coco is not None and coco.category_ids is not None:
                coco.check_classes(client.model(args.model)["classes"])
            with tqdm(total=len(files), file=sys.stderr, unit="img", disable=None) as bar:
                for result in client.detect_many([(str(f), f) for f in files], concurrency=args.concurrency,
                                                 **params):
                    if lines is not None:
                        print(json.dumps(result.to_json()), file=lines, flush=True)
                    if result.ok:
                        if coco is not None:
                            coco_entries += coco.results(result, files[result.index])
                    else:
                        failed += 1
                        first_failure = first_failure or result
                        if lines is not sys.stdout:
                            bar.write(f"error: {result.name}: {result.error}", file=sys.stderr)
                    bar.update()
    except InputError as exc:
        print(f"rtmdet client: error: {exc}", file=sys.stderr)
        return 2
    except DetectorError as exc:  # only the model-info call above; per-image errors are results
        print(f"rtmdet client: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.out and lines is not None:
            lines.close()
    if coco is not None:
        args.coco_results.write_text(json.dumps(coco_entries))
    print(summary(len(files), failed, first_failure), file=sys.stderr)
    return 1 if failed else 0


def _client(args: argparse.Namespace):
    from service.client import GrpcDetectorClient, HttpDetectorClient, RetryPolicy

    retry = RetryPolicy(max_attempts=args.attempts)
    tls = dict(ca=args.ca, cert=args.cert, key=args.key)
    if args.grpc or args.protocol == "grpc":
        return GrpcDetectorClient(args.target, api_key=args.api_key, timeout=args.timeout, retry=retry, tls=args.tls,
                                  **tls)
    return HttpDetectorClient(args.url, api_key=args.api_key, timeout=args.timeout, retry=retry, **tls)


def _list_models(args: argparse.Namespace) -> int:
    from service.client import DetectorError
    from service.schemas import ModelInfo

    try:
        with _client(args) as client:
            # Typed both ways: the HTTP JSON and the gRPC message read into the same ModelInfo.
            models = [ModelInfo.model_validate(m).model_dump(mode="json") for m in client.models()]
    except DetectorError as exc:
        print(f"rtmdet client: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(models, indent=2))
    return 0
