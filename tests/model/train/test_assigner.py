"""Dynamic Soft Label Assigner on cases small enough to work out by hand, and against a per-GT loop."""
import math

import torch

from model.assigner import DynamicSoftLabelAssigner
from model.boxes import grid_priors
from model.losses import box_iou_pairwise

NUM_CLASSES = 3


def _priors(size=40, stride=8):
    return grid_priors([(size // stride, size // stride)], [stride])


def _tiny_boxes_far_away(n):
    return torch.tensor([[1000.0, 1000.0, 1001.0, 1001.0]]).repeat(n, 1)  # IoU 0 with every GT


def test_all_inside_priors_positive_when_predictions_are_perfect():
    priors = _priors()
    gt = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    boxes = gt.repeat(len(priors), 1)  # every prediction equals the GT: IoU 1
    res = DynamicSoftLabelAssigner().assign(priors, torch.zeros(len(priors), NUM_CLASSES), boxes, gt,
                                            torch.tensor([1]))
    inside = (priors[:, 0] > 0) & (priors[:, 0] < 32) & (priors[:, 1] > 0) & (priors[:, 1] < 32)
    assert int(inside.sum()) == 9  # points 8, 16, 24 on each axis; the border (0 and 32) is not inside
    # dynamic k = int(sum of the top-13 IoUs) = int(9 * 1.0) = 9: all nine inside priors, nothing else
    assert torch.equal(res.positive, inside)
    assert torch.all(res.gt_index[inside] == 0)
    assert torch.allclose(res.iou[inside], torch.ones(9))
    assert torch.all(res.iou[~inside] == 0)


def test_k_is_one_and_centre_prior_decides_when_ious_are_zero():
    priors = _priors()
    gt = torch.tensor([[0.0, 0.0, 34.0, 28.0]])  # centre (17, 14): nearest inside point is (16, 16)
    res = DynamicSoftLabelAssigner().assign(priors, torch.zeros(len(priors), NUM_CLASSES),
                                            _tiny_boxes_far_away(len(priors)), gt, torch.tensor([0]))
    pos = res.positive.nonzero().squeeze(1)
    assert pos.tolist() == [2 * 5 + 2]  # row 2, column 2 of the 5 x 5 grid: (16, 16)
    assert float(res.iou[pos]) == 0.0


def test_prior_claimed_by_two_gts_keeps_the_cheaper():
    priors = _priors()
    gt = torch.tensor([[0.0, 0.0, 32.0, 32.0], [2.0, 2.0, 30.0, 30.0]])  # same centre (16, 16)
    boxes = _tiny_boxes_far_away(len(priors))
    centre = 2 * 5 + 2
    boxes[centre] = gt[0]  # IoU 1 with GT 0, (28/32)^2 = 0.766 with GT 1
    res = DynamicSoftLabelAssigner().assign(priors, torch.zeros(len(priors), NUM_CLASSES), boxes, gt,
                                            torch.tensor([0, 2]))
    # Both GTs get k = 1 and both want the centre prior; GT 0 is cheaper (IoU cost 0 vs -3 log 0.766 = 0.80,
    # more than the soft classification cost difference), so GT 1 ends up with no positive at all.
    assert res.positive.nonzero().squeeze(1).tolist() == [centre]
    assert int(res.gt_index[centre]) == 0
    assert math.isclose(float(res.iou[centre]), 1.0, rel_tol=1e-6)


def test_no_gt_or_no_inside_prior_gives_background():
    priors = _priors()
    a = DynamicSoftLabelAssigner()
    res = a.assign(priors, torch.zeros(len(priors), NUM_CLASSES), priors.clone(), torch.zeros(0, 4),
                   torch.zeros(0, dtype=torch.long))
    assert not res.positive.any()
    # A GT between grid points contains no prior point strictly inside it.
    res = a.assign(priors, torch.zeros(len(priors), NUM_CLASSES), priors.clone(), torch.tensor([[1.0, 1.0, 7.0, 7.0]]),
                   torch.tensor([0]))
    assert not res.positive.any()


def _reference_assign(priors, logits, boxes, gts, labels, topk=13):
    """Straightforward transcription of the seed's description: a loop over GTs, full (V, G, C) costs."""
    inside = torch.stack([((priors[:, 0] > g[0]) & (priors[:, 0] < g[2]) & (priors[:, 1] > g[1])
                           & (priors[:, 1] < g[3])) for g in gts], 1)
    valid = inside.any(1)
    vi = valid.nonzero().squeeze(1)
    ious = box_iou_pairwise(boxes[vi], gts)
    centre = (gts[:, :2] + gts[:, 2:]) / 2
    dist = torch.cdist(priors[vi, :2], centre) / priors[vi, 2:3]
    soft = torch.nn.functional.one_hot(labels, logits.shape[1]).float()[None] * ious[..., None]
    x = logits[vi][:, None, :].expand_as(soft)
    cls_cost = (torch.nn.functional.binary_cross_entropy_with_logits(x, soft, reduction="none")
                * (soft - x.sigmoid()).pow(2)).sum(-1)
    cost = cls_cost - 3 * torch.log(ious + 1e-7) + torch.pow(10, dist - 3)
    match = torch.zeros_like(cost, dtype=torch.bool)
    for g in range(len(gts)):
        k = max(1, int(ious[:, g].topk(min(topk, len(vi))).values.sum()))
        match[cost[:, g].topk(k, largest=False).indices, g] = True
    for r in range(len(vi)):
        if match[r].sum() > 1:
            match[r] = False
            match[r, cost[r].argmin()] = True
    gt_index = torch.full((len(priors),), -1)
    for r in range(len(vi)):
        if match[r].any():
            gt_index[vi[r]] = int(match[r].int().argmax())
    return gt_index


def test_matches_a_per_gt_reference_on_random_scenes():
    g = torch.Generator().manual_seed(3)
    priors = grid_priors([(12, 12), (6, 6), (3, 3)], [8, 16, 32])
    for _ in range(5):
        n = int(torch.randint(1, 9, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 60
        gts = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40 + 8], 1)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        logits = torch.randn(len(priors), NUM_CLASSES, generator=g)
        dist = torch.rand(len(priors), 4, generator=g) * 3 * priors[:, 2:3]
        boxes = torch.cat([priors[:, :2] - dist[:, :2], priors[:, :2] + dist[:, 2:]], 1)
        res = DynamicSoftLabelAssigner().assign(priors, logits, boxes, gts, labels)
        assert torch.equal(res.gt_index, _reference_assign(priors, logits, boxes, gts, labels))
        pos = res.positive
        expect_iou = box_iou_pairwise(boxes[pos], gts)[torch.arange(int(pos.sum())), res.gt_index[pos]]
        assert torch.allclose(res.iou[pos], expect_iou)
