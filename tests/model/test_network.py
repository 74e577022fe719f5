"""The network against the official MMDetection layout and outputs."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from model import SIZES, build_rtmdet, fused_for_inference
from model.testing import fill_deterministic

DATA = Path(__file__).resolve().parent.parent / "data"


def official(size: str) -> dict:
    return json.loads((DATA / "official" / f"rtmdet_{size}_keys.json").read_text())


@pytest.mark.parametrize("size", SIZES)
def test_state_dict_keys_shapes_and_order_equal_the_official_checkpoint(size):
    ref = official(size)
    model = build_rtmdet(size)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == ref["state_dict"]


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_equals_the_official_one(size):
    model = build_rtmdet(size)
    assert sum(p.numel() for p in model.parameters()) == official(size)["num_params_unique"]


def test_head_convs_are_shared_across_levels_and_bns_are_not():
    model = build_rtmdet("tiny")
    head = model.bbox_head
    state = model.state_dict()
    for alias, first in official("tiny")["alias_of"]:
        assert state[alias].data_ptr() == state[first].data_ptr()
    assert head.cls_convs[2][1].conv is head.cls_convs[0][1].conv
    assert head.reg_convs[1][0].conv is head.reg_convs[0][0].conv
    assert head.cls_convs[1][0].bn is not head.cls_convs[0][0].bn


@pytest.mark.parametrize("size", ["tiny", "s"])
def test_output_shapes_per_level(size):
    model = build_rtmdet(size, num_classes=7).eval()
    with torch.inference_mode():
        cls, reg = model(torch.zeros(2, 3, 96, 160))
    assert [tuple(c.shape) for c in cls] == [(2, 7, 12, 20), (2, 7, 6, 10), (2, 7, 3, 5)]
    assert [tuple(r.shape) for r in reg] == [(2, 4, 12, 20), (2, 4, 6, 10), (2, 4, 3, 5)]


@pytest.mark.parametrize("size", ["tiny", "s", "m"])
def test_forward_equals_mmdetection_outputs(size):
    """tests/data/parity holds MMDetection 3.3.0's raw outputs for seeded weights (tools/mmdet_parity.py)."""
    ref = torch.load(DATA / "parity" / f"rtmdet_{size}.pt", weights_only=True)
    model = fill_deterministic(build_rtmdet(size), ref["seed"]).eval()
    with torch.inference_mode():
        cls, reg = model(ref["input"])
    for ours, theirs in zip(cls + reg, ref["cls_scores"] + ref["bbox_preds"]):
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_exp_on_reg_only_for_m_l_x():
    assert not build_rtmdet("s").bbox_head.exp_on_reg
    assert build_rtmdet("m").bbox_head.exp_on_reg


def test_bn_folding_keeps_outputs():
    model = fill_deterministic(build_rtmdet("tiny"), 3).eval()
    fused = fused_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = model(x), fused(x)
    for p, q in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.allclose(p, q, atol=1e-4, rtol=1e-4)
    # the original keeps its official layout and its BNs
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 76


def test_chained_pools_equal_parallel_5_9_13_pools():
    x = torch.randn(2, 4, 17, 23)
    pool5 = torch.nn.MaxPool2d(5, 1, 2)
    chained = [pool5(x), pool5(pool5(x)), pool5(pool5(pool5(x)))]
    parallel = [torch.nn.MaxPool2d(k, 1, k // 2)(x) for k in (5, 9, 13)]
    for a, b in zip(chained, parallel):
        assert torch.equal(a, b)


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown RTMDet size 'xl'"):
        build_rtmdet("xl")


def test_depthwise_convs_train_in_channels_last_with_the_same_values_and_gradients():
    from model.nn.blocks import _DepthwiseConv2d

    torch.manual_seed(0)
    fast = _DepthwiseConv2d(8, 8, 5, padding=2, groups=8, bias=False)
    plain = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)
    plain.load_state_dict(fast.state_dict())
    x1 = torch.randn(2, 8, 13, 11, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = fast(x1), plain(x2)
    assert y1.is_contiguous()  # the rest of the network sees NCHW
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, atol=1e-4, rtol=1e-5)
    assert fast.state_dict().keys() == {"weight"}  # the official layout is untouched


def test_channels_last_training_gives_the_nchw_losses_and_gradients():
    # The Trainer runs the whole network in channels_last for speed; it must compute the same step.
    from model.checkpoint import standard_layout

    torch.manual_seed(0)
    nchw = build_rtmdet("tiny", num_classes=3).train()
    cl = build_rtmdet("tiny", num_classes=3).to(memory_format=torch.channels_last).train()
    cl.load_state_dict(nchw.state_dict())
    x = torch.randn(2, 3, 96, 96)
    boxes = [torch.tensor([[10.0, 12.0, 50.0, 60.0]]), torch.tensor([[30.0, 5.0, 90.0, 40.0], [0.0, 0.0, 20, 20]])]
    labels = [torch.tensor([0]), torch.tensor([2, 1])]
    totals = []
    for net, inp in ((nchw, x), (cl, x.contiguous(memory_format=torch.channels_last))):
        cls_scores, bbox_preds = net(inp)
        losses = net.bbox_head.loss(cls_scores, bbox_preds, boxes, labels)
        total = sum(losses["loss_cls"]) + sum(losses["loss_bbox"])
        total.backward()
        totals.append(total.detach())
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-5, atol=1e-6)
    grads = dict(cl.named_parameters())
    for name, p in nchw.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    # Written back in the official layout, the channels_last weights are the same numbers, contiguous.
    saved = standard_layout(cl.state_dict())
    assert all(v.is_contiguous() for v in saved.values())
    for k, v in nchw.state_dict().items():  # BN running statistics moved in both forwards: close, not equal
        torch.testing.assert_close(saved[k], v, rtol=1e-3, atol=1e-5, msg=k)
    for k, p in nchw.named_parameters():
        assert torch.equal(saved[k], p.detach()), k
