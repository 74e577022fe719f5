"""QFL and GIoU against their formulas; the head's loss against MMDetection's saved numbers."""
from pathlib import Path

import pytest
import torch

from model import build_rtmdet
from model.losses import aligned_giou, giou_loss, quality_focal_loss

PARITY = Path(__file__).resolve().parents[2] / "data" / "loss_parity_tiny.pt"


def test_qfl_matches_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g) * 2
    labels = torch.tensor([0, 4, 2, 4, 3, 1])  # 4 = background
    quality = torch.tensor([0.9, 0.0, 0.3, 0.0, 0.55, 0.01])
    y = torch.zeros(6, 4)
    for i, (lab, q) in enumerate(zip(labels.tolist(), quality.tolist(), strict=True)):
        if lab < 4:
            y[i, lab] = q
    s = logits.sigmoid()
    expected = (-(y - s).abs().pow(2) * ((1 - y) * torch.log(1 - s) + y * torch.log(s))).sum(1)
    assert torch.allclose(quality_focal_loss(logits, labels, quality), expected, atol=1e-6)


def test_giou_by_hand():
    pred = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 4, 4]])
    target = torch.tensor([[1.0, 1, 3, 3], [2, 2, 3, 3], [0, 0, 4, 4]])
    # overlap 1, union 7, enclosing 9 | disjoint: union 2, enclosing 9 | identical
    expected = torch.tensor([1 / 7 - 2 / 9, 0 - 7 / 9, 1.0])
    assert torch.allclose(aligned_giou(pred, target), expected)
    assert torch.allclose(giou_loss(pred, target), 1 - expected)


@pytest.mark.parametrize("case", range(4))
def test_head_loss_equals_mmdetection(case):
    """Saved by bench/mmdet_loss_parity.py from MMDetection 3.3.0's RTMDetHead.loss_by_feat."""
    data = torch.load(PARITY, weights_only=True)
    inp, ref = data["cases"][case], data["mmdet"][case]
    head = build_rtmdet("tiny").bbox_head
    cls = [c.clone().requires_grad_(True) for c in inp["cls_scores"]]
    reg = [r.clone().requires_grad_(True) for r in inp["bbox_preds"]]
    out = head.loss(cls, reg, inp["gt_boxes"], inp["gt_labels"])
    (sum(out["loss_cls"]) + sum(out["loss_bbox"])).backward()
    assert len(out["loss_cls"]) == len(out["loss_bbox"]) == 3
    for ours, theirs in zip(out["loss_cls"] + out["loss_bbox"], ref["loss_cls"] + ref["loss_bbox"], strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (ours, theirs)
    grads = [c.grad for c in cls] + [r.grad for r in reg]
    for ours, theirs in zip(grads, ref["grad_cls"] + ref["grad_reg"], strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-8)
    assert any(float(v) > 0 for v in ref["loss_bbox"])  # the cases do have positives
