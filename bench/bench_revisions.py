#!/usr/bin/env python3
"""The service at two revisions side by side: one server per revision, alternating closed-loop windows.

    .venv/bin/python bench/bench_revisions.py --old HEAD~1 [--new WORKTREE] [--input-size 320]
        [--protocol http|grpc] [--concurrency 32] [--duration 15] [--rounds 4] [--weights FILE]
        [--new-env KEY=VALUE ...]

`--old` (and `--new`, default: this working tree as it is) is any git revision; it is checked out into a
temporary `git worktree`, removed at the end. Both servers run at once on this machine (the idle one costs
nothing), with the same settings and the same checkpoint (default: bench_service's lively random one, ~100 boxes
an image, so post-processing and the answers cost what they do with a busy model); the load generator
alternates between them, old first in even rounds, new first in odd ones, so both see the same drift of a
shared machine. Prints each window and the median ratio new/old. Windows count whole answered requests, so
with batches of 8 their throughput moves in steps of 8 / duration. `--new-env` sets the new server's environment
only: `--old HEAD --new-env RTMDET_CANVAS=tight` is one tree against itself with one setting changed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import bench_service as bs  # noqa: E402

from model import save_checkpoint  # noqa: E402
from model.checkpoint import make_meta  # noqa: E402


@contextlib.contextmanager
def checked_out(rev: str | None):
    """A folder holding `rev` (a temporary worktree), or this working tree for None."""
    if rev is None:
        yield REPO
        return
    with tempfile.TemporaryDirectory(prefix="rtmdet-rev-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True,
                       timeout=120)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False,
                           timeout=120)


def window(server: tuple[subprocess.Popen, str, str], data: bytes, args) -> float:
    _, base, target = server
    if args.protocol == "http":
        ips, _, errors = asyncio.run(bs.load_http(f"{base}/detect", data, args.concurrency, 4, args.duration))
    else:
        ips, _, errors = asyncio.run(bs.load_grpc(target, data, args.concurrency, 4, args.duration))
    if errors:
        raise SystemExit(f"{errors} requests failed")
    return ips


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="git revision to compare against")
    ap.add_argument("--new", default=None, help="git revision (default: this working tree, uncommitted changes too)")
    ap.add_argument("--weights", type=Path, default=None, help="checkpoint (default: a lively random tiny one)")
    ap.add_argument("--input-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--accelerate", default=None)
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--image", type=Path, default=REPO / "examples" / "astronaut.jpg")
    ap.add_argument("--new-env", nargs="+", default=[], metavar="KEY=VALUE",
                    help="environment for the new server only (a setting against itself)")
    args = ap.parse_args()
    new_env = dict(kv.split("=", 1) for kv in args.new_env)
    data = args.image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="rtmdet-bench-") as tmp, \
            checked_out(args.old) as old_tree, checked_out(args.new) as new_tree:
        weights = args.weights
        if weights is None:
            weights = Path(tmp) / "random_tiny.pth"
            save_checkpoint(weights, bs.lively_random_model("tiny").state_dict(), make_meta())
        servers = {"old": bs.start_server(weights, args, old_tree),
                   "new": bs.start_server(weights, args, new_tree, new_env)}
        got: dict[str, list[float]] = {"old": [], "new": []}
        try:
            for r in range(args.rounds):
                for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    got[name].append(window(servers[name], data, args))
                    print(f"round {r + 1} {name}: {got[name][-1]:.2f} img/s", flush=True)
        finally:
            for proc, _, _ in servers.values():
                bs.stop_server(proc)
    old, new = statistics.median(got["old"]), statistics.median(got["new"])
    ratios = " ".join(f"{b / a:.3f}" for a, b in zip(got["old"], got["new"]))
    print(f"{args.protocol} at {args.input_size}, concurrency {args.concurrency}: old {args.old} {old:.2f} img/s, "
          f"new {args.new or 'working tree'} {' '.join(args.new_env)} {new:.2f} img/s, "
          f"new/old {new / old:.3f}x (per round: {ratios})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
