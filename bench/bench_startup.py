#!/usr/bin/env python3
"""How long a fresh process takes: `rtmdet serve` until it listens and until it is ready, a whole `rtmdet detect`
of one image and `rtmdet --help`, beside a bare `import torch` (the floor no change here can go below).

    .venv/bin/python bench/bench_startup.py [--old REV [--new REV]] [--rounds 4] [--weights FILE]

With `--old`, each measurement alternates between the two revisions (temporary `git worktree`s, as in
bench_revisions.py; `--new` defaults to this working tree), old first in even rounds, new first in odd ones, and
the table gives the medians and new/old. Every process is a new interpreter, so what it measures includes
imports, the checkpoint load and the warm-up, as a user (or Kubernetes' start-up probe) sees them. The page
cache is warm after the first round; the first round is therefore not counted.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from bench_revisions import checked_out  # noqa: E402
from bench_service import free_port, stop_server, wait_for  # noqa: E402

DEFAULT_WEIGHTS = REPO / "weights" / "rtmdet_tiny_shapes.pth"
LIMIT_S = 300.0


# The `rtmdet` console script, as a user runs it (`make install` puts it beside this interpreter); PYTHONPATH
# points it at the tree being measured.
RTMDET = str(Path(sys.executable).with_name("rtmdet"))


def env_for(tree: Path) -> dict[str, str]:
    """A user's environment: nothing of ours set, in particular no OMP_WAIT_POLICY (`serve` sets its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTMDET_") and k != "OMP_WAIT_POLICY"}
    return {**env, "PYTHONPATH": str(tree), "RTMDET_DEVICE": "cpu"}


def serve_times(tree: Path, weights: Path) -> tuple[float, float]:
    """Seconds from exec to /healthz answering (listening) and to /readyz answering (model loaded, warm)."""
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([RTMDET, "serve", "--weights", str(weights),
                             "--http-port", str(port), "--grpc-port", str(free_port())], cwd=tree, env=env_for(tree),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = t0 + LIMIT_S
        listening = wait_for(f"http://127.0.0.1:{port}/healthz", proc, end)
        ready = wait_for(f"http://127.0.0.1:{port}/readyz", proc, end)
    finally:
        stop_server(proc)
    return listening - t0, ready - t0


def run_time(tree: Path, cmd: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=tree, env=env_for(tree), check=True, timeout=LIMIT_S, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def measure(tree: Path, weights: Path, image: Path) -> dict[str, float]:
    listening, ready = serve_times(tree, weights)
    return {
        "import torch": run_time(tree, [sys.executable, "-c", "import torch"]),
        "rtmdet serve: listening": listening,
        "rtmdet serve: ready": ready,
        "rtmdet detect (one image)": run_time(tree, [RTMDET, "detect", str(image), "--weights", str(weights)]),
        "rtmdet --help": run_time(tree, [RTMDET, "--help"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default=None, help="git revision to compare against (default: none, this tree alone)")
    ap.add_argument("--new", default=None, help="git revision (default: this working tree, uncommitted changes too)")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--image", type=Path, default=REPO / "examples" / "shapes.jpg")
    ap.add_argument("--rounds", type=int, default=4, help="counted rounds (one more runs first, uncounted)")
    args = ap.parse_args()
    weights, image = args.weights.resolve(), args.image.resolve()
    names = ("old", "new") if args.old else ("new",)
    got: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with checked_out(args.old) if args.old else contextlib.nullcontext() as old_tree, checked_out(args.new) as new_tree:
        trees = {"old": old_tree, "new": new_tree}
        for r in range(args.rounds + 1):
            for name in names if r % 2 == 0 else names[::-1]:
                m = measure(trees[name], weights, image)
                print(f"round {r}{' (uncounted)' if r == 0 else ''} {name}: "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in m.items()), flush=True)
                if r > 0:
                    got[name].append(m)
    rows = list(got["new"][0])
    med = {n: {k: statistics.median(m[k] for m in got[n]) for k in rows} for n in names}
    head = f"| seconds (median of {args.rounds}) | " + " | ".join(
        [f"old {args.old}", f"new {args.new or 'working tree'}", "new / old"] if args.old else ["this tree"]) + " |"
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    for k in rows:
        cells = [f"{med['old'][k]:.2f}", f"{med['new'][k]:.2f}", f"{med['new'][k] / med['old'][k]:.2f}x"] \
            if args.old else [f"{med['new'][k]:.2f}"]
        print(f"| {k} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
