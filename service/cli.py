"""The `rtmdet` program: the model's commands plus the service's."""
from __future__ import annotations

import argparse
import sys

from model.checkpoint_cli import add_convert_checkpoint
from model.cli import add_detect
from model.cli_support import OneLineArgumentParser, run_command
from model.data.cli import add_convert, add_make_shapes_dataset
from model.export_cli import add_export
from model.train.cli import add_eval, add_train
from service.commands import add_client, add_serve


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="rtmdet", description="RTMDet detection: run, train, serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_detect(sub)
    add_serve(sub)
    add_client(sub)
    add_make_shapes_dataset(sub)
    add_convert(sub)
    add_train(sub)
    add_eval(sub)
    add_export(sub)
    add_convert_checkpoint(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a mistake in the command line or its files (one line on stderr), 1 a failure."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad command line (already reported in one line)
        return exc.code if isinstance(exc.code, int) else 2
    return run_command(f"rtmdet {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
