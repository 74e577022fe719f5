"""`rtmdet export`: a checkpoint to ONNX (checked against PyTorch), or to a Triton model repository."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.config import SIZES

FORMATS = ("onnx", "triton")


def add_export(sub: argparse._SubParsersAction) -> None:
    from model.cli import DEFAULT_WEIGHTS

    p = sub.add_parser("export", help="export the network as ONNX or as a Triton model repository")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="checkpoint file or zoo name (rtmdet-s, ...)")
    p.add_argument("--size", default=None, choices=SIZES, help="default: the zoo name's size, else tiny")
    p.add_argument("--format", default="onnx", choices=FORMATS,
                   help="onnx: one .onnx file; triton: a model repository folder (ONNX inside, dynamic batch)")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file, or the repository folder for triton")
    p.add_argument("--img-size", type=int, default=640,
                   help="input size: the square the graph is fixed to (with --dynamic-canvas, the one it is traced at)")
    p.add_argument("--fp16", action="store_true", help="half-precision weights and activations inside the graph")
    p.add_argument("--dynamic-batch", action="store_true", help="a variable batch axis (always on for triton)")
    p.add_argument("--dynamic-canvas", action="store_true",
                   help="a variable height and width (multiples of 32), for the tight canvas (onnx format only)")
    p.add_argument("--batch-size", type=int, default=1, help="the fixed batch size without --dynamic-batch")
    p.add_argument("--decode", action="store_true",
                   help="decode boxes inside the graph: outputs boxes (B,N,4) and scores (B,N,C) instead of heads")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch comparison")
    p.add_argument("--triton-backend", default="python", choices=("python", "onnxruntime"),
                   help="python: onnxruntime inside Triton's Python backend (works on every build); "
                        "onnxruntime: Triton's own ONNX Runtime backend (official NGC images)")
    p.add_argument("--triton-instance", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--model-name", default="rtmdet")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from model.checkpoint import (
        CheckpointError,
        class_names_from_meta,
        infer_num_classes,
        load_state_dict_strict,
        read_checkpoint,
    )
    from model.classes import COCO_CLASSES
    from model.export import export_onnx
    from model.inference.detector import file_sha256
    from model.nn.rtmdet import build_rtmdet
    from model.triton_repo import TritonModelConfig, write_triton_repository
    from model.zoo import resolve_weights, zoo_size

    try:
        weights = resolve_weights(args.weights, kind="detector", size=args.size)
        state, meta = read_checkpoint(weights)
        num_classes = infer_num_classes(state) or 80
        model = build_rtmdet(args.size or zoo_size(args.weights) or "tiny", num_classes)
        load_state_dict_strict(model, state, source=str(args.weights))
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = class_names_from_meta(meta) or (list(COCO_CLASSES) if num_classes == 80
                                            else [f"class_{i}" for i in range(num_classes)])
    triton = args.format == "triton"
    if triton and args.dynamic_canvas:
        print("error: --dynamic-canvas is for --format onnx: the service's Triton backend sends square canvases",
              file=sys.stderr)
        return 2
    onnx_path = args.out / args.model_name / "1" / "model.onnx" if triton else args.out
    try:
        report = export_onnx(model, onnx_path, names, input_size=args.img_size,
                             layout="decoded" if args.decode else "heads", fp16=args.fp16,
                             dynamic_batch=args.dynamic_batch or triton, batch_size=args.batch_size,
                             weights_sha256=file_sha256(weights), check=not args.no_check,
                             dynamic_canvas=args.dynamic_canvas)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if triton:
        cfg = TritonModelConfig(name=args.model_name, backend=args.triton_backend,
                                max_batch_size=args.max_batch_size,
                                instance_kind="KIND_GPU" if args.triton_instance == "gpu" else "KIND_CPU")
        model_dir = write_triton_repository(onnx_path, args.out, cfg)
        print(f"wrote Triton model repository {args.out} (model {model_dir.name}, backend {cfg.backend})",
              file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    print(report.to_json())
    return 0
