"""`rtmdet eval` end to end: progress bar, per-class AP, PR-curve plot, detections JSON, evaluation backends."""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from model.data.shapes import SHAPE_CLASSES, make_shapes_dataset

REPO = Path(__file__).resolve().parents[3]
WEIGHTS = REPO / "weights" / "rtmdet_tiny_shapes.pth"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, 0, 6, seed=21, img_size=160)
    return root


def _eval(shapes: Path, *extra: str, stderr_tty: bool = False) -> subprocess.CompletedProcess:
    """Run `rtmdet eval`; with `stderr_tty` its stderr is a pseudo-terminal (the bar is only drawn on one)."""
    cmd = [sys.executable, "-m", "service.cli", "eval", "--weights", str(WEIGHTS), "--data", str(shapes),
           "--img-size", "160", "--batch-size", "3", "--device", "cpu", *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if not stderr_tty:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    else:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
        with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=slave, text=True, env=env) as proc:
            os.close(slave)
            chunks: list[bytes] = []
            reader = threading.Thread(target=_drain, args=(master, chunks), daemon=True)
            reader.start()
            out = proc.communicate(timeout=300)[0]
            reader.join(timeout=30)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out, b"".join(chunks).decode(errors="replace"))
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _drain(fd: int, chunks: list[bytes]) -> None:
    try:
        while data := os.read(fd, 4096):
            chunks.append(data)
    except OSError:  # EIO once the child has closed its end
        pass
    finally:
        os.close(fd)


def _pycocotools_stats(shapes: Path, dets: Path) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(shapes / "annotations" / "instances_val.json"))
        evaluator = COCOeval(gt, gt.loadRes(str(dets)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


@pytest.fixture(scope="module")
def saved(shapes, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    plot, dets = out / "plots" / "pr.png", out / "dets.json"
    res = _eval(shapes, "--backend", "pycocotools", "--plot-pr", str(plot), "--save-json", str(dets), stderr_tty=True)
    return {"res": res, "plot": plot, "dets": dets}


def test_eval_prints_per_class_ap_and_writes_plot_and_detections(shapes, saved):
    res, plot, dets = saved["res"], saved["plot"], saved["dets"]
    lines = res.stdout.rstrip().splitlines()
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = ")
    ap = float(lines[0].rsplit("=", 1)[1])
    assert lines[11].startswith(" Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = ")
    header = next(i for i, line in enumerate(lines) if line.split() == ["class", "AP", "AP50"])
    rows = lines[header + 1:]
    assert [r.split()[0] for r in rows] == list(SHAPE_CLASSES)
    for r in rows:  # AP and AP50 per class ('-' for a class these 6 images do not contain)
        assert re.fullmatch(r" \w+ +(\d\.\d{3}|-) +(\d\.\d{3}|-)", r), r
    class_ap = [float(r.split()[1]) for r in rows if r.split()[1] != "-"]
    assert sum(class_ap) / len(class_ap) == pytest.approx(ap, abs=1e-3)  # the summary AP is their mean
    # The bar goes to stderr (a terminal here), with the image count; stdout holds only the tables.
    assert re.search(r"eval: 100%\|.*\| 6/6", res.stderr), res.stderr[-500:]
    assert "eval:" not in res.stdout

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(plot).shape[:2] == (600, 800)

    detections = json.loads(dets.read_text())
    assert detections and {tuple(sorted(d)) for d in detections} == {("bbox", "category_id", "image_id", "score")}
    # The file is a COCO results file: pycocotools re-scores it to the printed AP.
    assert _pycocotools_stats(shapes, dets)[0] == pytest.approx(ap, abs=5e-4)


def test_faster_coco_eval_backend_gives_the_pycocotools_numbers(shapes, saved):
    fast = _eval(shapes, "--backend", "faster-coco-eval", "--json", "--no-progress")
    stats = json.loads(fast.stdout.splitlines()[-1])
    # The same detections (the pipeline is deterministic) scored by pycocotools from the saved file.
    assert list(stats.values()) == pytest.approx(_pycocotools_stats(shapes, saved["dets"]), abs=1e-12)
    assert "eval:" not in fast.stderr  # stderr is a pipe here: no bar (an error stays the only line)
