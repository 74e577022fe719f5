"""`model.inference.nms`: torchvision's decisions, without importing the torchvision package."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.ops

from model.inference import nms as nms_module
from model.inference.nms import PER_GROUP_ABOVE_CPU, batched_nms, nms

REPO = Path(__file__).resolve().parents[2]


def crowded_boxes(n: int, seed: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` boxes crowded into a small canvas (so NMS has much to suppress), with tied scores among them."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = 5 + torch.rand(n, 2, generator=g) * 60
    scores = (torch.rand(n, generator=g) * 50).round() / 50  # ties: greedy NMS must break them as torchvision does
    return torch.cat([xy, xy + wh], 1), scores, torch.randint(0, groups, (n,), generator=g)


@pytest.mark.parametrize("n,groups", [(0, 1), (1, 1), (300, 1), (900, 7), (PER_GROUP_ABOVE_CPU // 4 + 1, 7),
                                      (3000, 80), (5000, 3)])
def test_batched_nms_keeps_what_torchvision_keeps_in_its_order(n, groups):
    for seed in range(3):
        boxes, scores, idxs = crowded_boxes(n, seed, groups)
        ours = batched_nms(boxes, scores, idxs, 0.6)
        theirs = torchvision.ops.batched_nms(boxes, scores, idxs, 0.6)
        assert ours.dtype == torch.int64
        assert ours.tolist() == theirs.tolist()


def test_nms_keeps_what_torchvision_keeps():
    boxes, scores, _ = crowded_boxes(2000, 5, 1)
    for iou in (0.3, 0.65, 0.9):
        assert nms(boxes, scores, iou).tolist() == torchvision.ops.nms(boxes, scores, iou).tolist()


def run_fresh(code: str) -> dict:
    """`code` in a new interpreter (this test process imported torchvision long ago); its last line is JSON."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_serving_and_detecting_never_import_torchvision_or_dynamo():
    """`import torchvision` costs seconds (its models, and torch._dynamo through ops.roi_align) in every server,
    CLI and worker process; detecting needs one kernel of it."""
    seen = run_fresh(
        "import json, sys, cv2\n"
        "import service.server, service.cli\n"
        "from model import Detector, TestConfig\n"
        "det = Detector.from_checkpoint('weights/rtmdet_tiny_shapes.pth', size='tiny', device='cpu',\n"
        "                               test_cfg=TestConfig.serving(input_size=320))\n"
        "out = det([cv2.imread('examples/shapes.jpg')] * 2)\n"
        "print(json.dumps({'boxes': len(out[0]), 'torchvision': 'torchvision' in sys.modules,\n"
        "                  'dynamo': 'torch._dynamo' in sys.modules}))\n")
    assert seen["boxes"] > 0  # NMS really ran
    assert seen == {"boxes": seen["boxes"], "torchvision": False, "dynamo": False}


def test_without_the_library_file_it_falls_back_to_importing_torchvision():
    seen = run_fresh(
        "import json, sys, torch\n"
        "from model.inference import nms as m\n"
        "m._LIBRARY = 'no_such_library'\n"
        "b = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])\n"
        "keep = m.nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5)\n"
        "print(json.dumps({'keep': keep.tolist(), 'torchvision': 'torchvision' in sys.modules}))\n")
    assert seen == {"keep": [0, 2], "torchvision": True}
    assert nms_module._LIBRARY != "no_such_library"  # the child's change stayed in the child
