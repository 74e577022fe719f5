"""`rtmdet train` and `rtmdet eval`."""
from __future__ import annotations

import argparse
import json
import sys

from model.cli_support import (
    add_accelerate_arguments,
    add_canvas_argument,
    add_weights_key_argument,
    device_name,
    non_negative_int,
    positive_float,
    positive_int,
)
from model.config import SIZES
from model.data.instances import FORMATS


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train RTMDet on a COCO, YOLO or VOC dataset (torchrun for several processes)")
    p.add_argument("--data", required=True,
                   help="COCO folder (annotations/instances_{train,val}.json + train/, val/), YOLO folder or "
                        "data.yaml, or Pascal VOC root (Annotations/, JPEGImages/, ImageSets/Main/)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="dataset layout (auto: recognise it)")
    p.add_argument("--size", default="tiny", choices=["tiny", "s", "m", "l", "x"])
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per process")
    p.add_argument("--img-size", type=positive_int, default=640)
    p.add_argument("--stage2-epochs", type=non_negative_int, default=20, help="last epochs with the weak pipeline")
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, plots")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    p.add_argument("--load-from", default=None, metavar="WEIGHTS",
                   help="start from these weights (official or ours; a different class count re-initialises the "
                        "classification convs) with a fresh schedule; or a zoo name: rtmdet-tiny ... rtmdet-x")
    p.add_argument("--backbone-weights", default=None, metavar="WEIGHTS",
                   help="ImageNet-pretrained CSPNeXt for the backbone (an RSB classifier checkpoint, a bare backbone "
                        "state_dict, or a zoo name: cspnext-tiny-imagenet ... cspnext-x-imagenet)")
    p.add_argument("--workers", type=non_negative_int, default=4,
                   help="data loader worker processes per training process")
    p.add_argument("--loader-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="end the run with an error naming the worker when no batch arrives for this long "
                        "(default 300)")
    p.add_argument("--val-interval", type=positive_int, default=10, help="validate every K epochs (and after the last)")
    p.add_argument("--warmup-iters", type=non_negative_int, default=1000)
    p.add_argument("--base-lr", type=positive_float, default=0.004,
                   help="AdamW lr for a total batch of 256 (scaled linearly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--no-amp", action="store_true", help="train in float32 on CUDA too")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across CUDA processes")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network: faster steps after a one-off compile (minutes on a small CPU)")
    p.add_argument("--log-interval", type=positive_int, default=10, help="iterations per CSV/TensorBoard row")
    p.add_argument("--save-interval", type=positive_int, default=1, help="epochs between OUT/last.pth writes")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch CPU threads per process (0: torch default)")
    p.add_argument("--max-val-images", type=positive_int, default=None)
    p.add_argument("--no-progress", action="store_true")
    add_weights_key_argument(p)  # for --load-from
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from model.data.loader import DataLoaderStalled
    from model.train.engine import TrainConfig, train

    cfg = TrainConfig(data=args.data, out=args.out, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                      img_size=args.img_size, stage2_epochs=args.stage2_epochs, workers=args.workers,
                      val_interval=args.val_interval, seed=args.seed, device=args.device, amp=not args.no_amp,
                      sync_bn=args.sync_bn, compile=args.compile, resume=args.resume, load_from=args.load_from,
                      load_from_key=args.weights_key or "ema",
                      data_format=args.format, backbone_weights=args.backbone_weights,
                      warmup_iters=args.warmup_iters, base_lr=args.base_lr,
                      log_interval=args.log_interval, save_interval=args.save_interval,
                      threads=args.threads, max_val_images=args.max_val_images,
                      progress=not args.no_progress,
                      **({} if args.loader_timeout is None else {"loader_timeout_s": args.loader_timeout}))
    try:
        result = train(cfg)
    except DataLoaderStalled as e:
        print(f"rtmdet train: {e}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps({k: v for k, v in result.items() if k != "last_val"} | {"last_val": result["last_val"]}))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="COCO mAP of a checkpoint on a split of a COCO, YOLO or VOC dataset")
    p.add_argument("--weights", required=True, help="checkpoint file or zoo name (rtmdet-tiny ... rtmdet-x)")
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="dataset layout (auto: recognise it)")
    p.add_argument("--split", default="val")
    p.add_argument("--size", default=None, choices=SIZES, help="model size (default: the checkpoint's meta, else tiny)")
    p.add_argument("--img-size", type=positive_int, default=640)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object with pycocotools' names")
    p.add_argument("--backend", default="auto", choices=["auto", "pycocotools", "faster-coco-eval"],
                   help="COCO evaluator (auto: faster-coco-eval when installed, else pycocotools; same numbers)")
    p.add_argument("--plot-pr", metavar="FILE", help="write precision-recall curves per class (PNG) here")
    p.add_argument("--save-json", metavar="FILE", help="write the detections here in the COCO results format")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal)")
    add_weights_key_argument(p)
    add_accelerate_arguments(p)
    add_canvas_argument(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError, infer_num_classes, load_state_dict_strict, read_checkpoint
    from model.data.coco_eval import format_class_table, format_coco_table, resolve_backend
    from model.data.formats import open_split
    from model.inference.allocator import keep_freed_memory
    from model.nn.rtmdet import build_rtmdet
    from model.train.evaluate import evaluate_model_full, save_results_json
    from model.train.plots import plot_pr_curves
    from model.zoo import resolve_weights, zoo_size

    backend = resolve_backend(args.backend)  # before the slow part: a missing package fails at once
    keep_freed_memory()  # a command owns its process (model.inference.allocator)

    state, meta = read_checkpoint(resolve_weights(args.weights, kind="detector", size=args.size),
                                  args.weights_key or "ema")
    size = args.size or meta.get("size") or zoo_size(args.weights) or "tiny"
    dataset = open_split(args.data, args.split, args.format)
    found = infer_num_classes(state)
    if found is not None and found != dataset.num_classes:
        raise CheckpointError(f"{args.weights}: has {found} classes, but the {args.split} split of {args.data} has "
                              f"{dataset.num_classes}")
    model = build_rtmdet(size, num_classes=dataset.num_classes)
    load_state_dict_strict(model, state, source=args.weights)
    result, detections = evaluate_model_full(model, dataset, args.img_size,
                                             None if args.device == "auto" else args.device, args.batch_size,
                                             backend=backend, progress=False if args.no_progress else None,
                                             accelerate=args.accelerate, calibration=args.calibration,
                                             canvas=args.canvas)
    if args.save_json:
        save_results_json(args.save_json, detections, dataset.label_to_cat_id)
    if args.plot_pr:
        plot_pr_curves(result, args.plot_pr)
    if args.json:
        print(json.dumps(result.stats))
    else:
        print(format_coco_table(result.stats))
        print()
        print(format_class_table(result))
    return 0
