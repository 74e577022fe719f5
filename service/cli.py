"""The `rtmdet` program: the model's commands plus the service's."""
from __future__ import annotations

import argparse
import sys

from model.cli import add_detect
from model.data.cli import add_convert, add_make_shapes_dataset
from model.export_cli import add_export
from model.train.cli import add_eval, add_train
from service.commands import add_client, add_serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtmdet", description="RTMDet detection: run, train, serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_detect(sub)
    add_serve(sub)
    add_client(sub)
    add_make_shapes_dataset(sub)
    add_convert(sub)
    add_train(sub)
    add_eval(sub)
    add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
