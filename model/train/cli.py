"""`rtmdet train` and `rtmdet eval`."""
from __future__ import annotations

import argparse
import json

from model.cli_support import (
    add_weights_key_argument,
    device_name,
    non_negative_int,
    positive_float,
    positive_int,
)
from model.config import SIZES


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train RTMDet on a COCO-format dataset (torchrun for several processes)")
    p.add_argument("--data", required=True, help="folder with annotations/instances_{train,val}.json + train/, val/")
    p.add_argument("--size", default="tiny", choices=["tiny", "s", "m", "l", "x"])
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per process")
    p.add_argument("--img-size", type=positive_int, default=640)
    p.add_argument("--stage2-epochs", type=non_negative_int, default=20, help="last epochs with the weak pipeline")
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, plots")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    p.add_argument("--load-from", default=None, metavar="WEIGHTS",
                   help="start from these weights (official or ours; a different class count re-initialises the "
                        "classification convs) with a fresh schedule")
    p.add_argument("--workers", type=non_negative_int, default=4,
                   help="data loader worker processes per training process")
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
    from model.train.engine import TrainConfig, train

    cfg = TrainConfig(data=args.data, out=args.out, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                      img_size=args.img_size, stage2_epochs=args.stage2_epochs, workers=args.workers,
                      val_interval=args.val_interval, seed=args.seed, device=args.device, amp=not args.no_amp,
                      sync_bn=args.sync_bn, compile=args.compile, resume=args.resume, load_from=args.load_from,
                      load_from_key=args.weights_key or "ema",
                      warmup_iters=args.warmup_iters, base_lr=args.base_lr,
                      log_interval=args.log_interval, save_interval=args.save_interval,
                      threads=args.threads, max_val_images=args.max_val_images,
                      progress=not args.no_progress)
    result = train(cfg)
    if result is not None:
        print(json.dumps({k: v for k, v in result.items() if k != "last_val"} | {"last_val": result["last_val"]}))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="COCO mAP of a checkpoint on a COCO-format split")
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--size", default=None, choices=SIZES, help="model size (default: the checkpoint's meta, else tiny)")
    p.add_argument("--img-size", type=positive_int, default=640)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object with pycocotools' names")
    add_weights_key_argument(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError, infer_num_classes, load_state_dict_strict, read_checkpoint
    from model.data.coco import CocoDetection
    from model.data.coco_eval import format_coco_table
    from model.nn.rtmdet import build_rtmdet
    from model.train.evaluate import evaluate_model, find_split

    state, meta = read_checkpoint(args.weights, args.weights_key or "ema")
    size = args.size or meta.get("size") or "tiny"
    ann, img_dir = find_split(args.data, args.split)
    dataset = CocoDetection(ann, img_dir, filter_empty=False)
    found = infer_num_classes(state)
    if found is not None and found != dataset.num_classes:
        raise CheckpointError(f"{args.weights}: has {found} classes, but {ann} has {dataset.num_classes} categories")
    model = build_rtmdet(size, num_classes=dataset.num_classes)
    load_state_dict_strict(model, state, source=args.weights)
    stats = evaluate_model(model, dataset, args.img_size, None if args.device == "auto" else args.device,
                           args.batch_size)
    if args.json:
        print(json.dumps(stats))
    else:
        print(format_coco_table(stats))
    return 0
