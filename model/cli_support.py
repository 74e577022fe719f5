"""What every `rtmdet` sub-command shares: a user's mistake is one line on stderr and exit code 2.

A mistake is a `model.errors.UserError` (a checkpoint, image, data folder or value we cannot use), an `OSError`
(a path that is missing, unreadable or unwritable) or a bad flag (argparse, here in one line). Anything else
that escapes a command is a bug: its traceback, then one line asking to report it, exit code 1.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from model.errors import UserError

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: str) -> str:
    """`text` without terminal colour codes, its lines joined: a message fit for one stderr line. An error
    re-raised from a data-loader worker carries the worker's traceback: only its last line (the error) is kept."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        lines = lines[-1:]
    if not lines:
        return "(no message)"
    return "".join(line + ("" if i == len(lines) - 1 else " " if line.endswith(":") else "; ")
                   for i, line in enumerate(lines))


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line (argparse's own error repeats the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(kind: Callable[[str], float], test: Callable[[float], bool], want: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}")
        return value
    parse.__name__ = want  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1")
positive_float = _number(float, lambda v: v > 0, "a number > 0")


def quiet_opencv() -> None:
    """OpenCV's `[ WARN ]` lines (e.g. for a file it cannot open) off, here and in worker processes: every
    image we cannot read is reported by us, in one line that names it."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def run_command(prog: str, command: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run one sub-command; the exit code as the module docstring says."""
    quiet_opencv()
    try:
        return int(command(args) or 0)
    except (UserError, OSError) as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"{prog}: internal error: this is a bug; please report it with the traceback above and the command "
              "line", file=sys.stderr, flush=True)
        return 1


def add_weights_key_argument(parser: argparse.ArgumentParser, flag: str = "--weights-key") -> None:
    """The flag that picks a training checkpoint's weights (`model.checkpoint` explains the layout)."""
    from model.config import WEIGHTS_KEYS

    parser.add_argument(flag, choices=WEIGHTS_KEYS, default=None,
                        help="which weights of a training checkpoint: ema (default) = its `state_dict`, the EMA "
                             "weights MMDetection evaluates and publishes; raw = the training weights mmengine's "
                             "EMAHook keeps in `ema_state_dict`")


def device_name(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda, cuda:N, ... and only devices this machine has."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def add_canvas_argument(parser: argparse.ArgumentParser) -> None:
    """--canvas: the letterbox's canvas (TestConfig.canvas)."""
    from model.config import CANVASES

    parser.add_argument("--canvas", choices=CANVASES, default="square",
                        help="square: pad every image to img-size x img-size (the official pipeline); tight: only up "
                             "to a multiple of 32, so a 4:3 image runs at 640 x 480 (faster, boxes a little different)")


def add_accelerate_arguments(parser: argparse.ArgumentParser) -> None:
    """--accelerate (how the network runs, model.inference.accelerate) and --calibration (openvino-int8's images)."""
    from model.inference.modes import ALIASES, MODES

    parser.add_argument("--accelerate", choices=(*MODES, *ALIASES), default=None,
                        help="how the network runs (default: eager on the CPU, cudagraph on CUDA); auto measures "
                             "the float32 runners and keeps the fastest; openvino-bf16 / openvino-int8 are reduced "
                             "precision, by name only")
    parser.add_argument("--calibration", type=Path, default=None, metavar="FOLDER",
                        help="openvino-int8: a folder of real images to calibrate on (letterboxed as served; the "
                             "first 300 in name order)")
