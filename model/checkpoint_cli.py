"""`rtmdet convert-checkpoint IN OUT`: any checkpoint we read (mmengine training file, ours, bare state dict,
safetensors) written in the published `{meta, state_dict}` form, which `torch.load(weights_only=True)` reads."""
from __future__ import annotations

import argparse
from pathlib import Path

from model.cli_support import add_weights_key_argument


def add_convert_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-checkpoint", help="write a checkpoint (e.g. an MMDetection training file) in the "
                                                  "published {meta, state_dict} form")
    p.add_argument("input", type=Path, help="the checkpoint to read")
    p.add_argument("output", type=Path, help="the file to write: .pth, or .safetensors")
    add_weights_key_argument(p)
    p.set_defaults(func=run_convert_checkpoint)


def run_convert_checkpoint(args: argparse.Namespace) -> int:
    from model.checkpoint import (
        CheckpointError,
        class_names_from_meta,
        fitting_size,
        read_checkpoint,
        save_checkpoint,
    )
    from model.errors import UserError

    if args.output.exists() and args.output.resolve() == args.input.resolve():
        raise UserError(f"{args.output}: is the input; write the converted file elsewhere")
    if args.output.is_dir():
        raise UserError(f"{args.output}: is a folder; give the file to write (.pth or .safetensors)")
    state, meta = read_checkpoint(args.input, args.weights_key or "ema")
    size = fitting_size(state)
    if size is None:
        raise CheckpointError(f"{args.input}: its weights do not fit RTMDet of any size (tiny, s, m, l, x)")
    meta.setdefault("size", size)  # `rtmdet eval` and the service read the size from here
    save_checkpoint(args.output, state, meta)
    names = class_names_from_meta(meta)
    print(f"wrote {args.output}: RTMDet-{size}, {args.weights_key or 'ema'} weights, "
          f"{len(names) if names else 'unnamed'} classes{': ' + ', '.join(names[:5]) if names else ''}")
    return 0
