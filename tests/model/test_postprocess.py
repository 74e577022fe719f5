"""Batched post-processing against a plain per-image, per-level reference written here."""
import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, nms

from model.config import TestConfig
from model.inference.postprocess import ONE_CALL_MAX, PREFIX_MIN, best_per_image, nms_top, postprocess
from model.inference.preprocess import letterbox, resized_shape

STRIDES = (8, 16, 32)


def reference(cls_scores, bbox_preds, scale_wh, orig_wh, cfg):
    """MMDetection's `_predict_by_feat_single`, one image and one class at a time, no vectorisation tricks."""
    out = []
    for b in range(cls_scores[0].shape[0]):
        boxes, scores, labels = [], [], []
        canvas_h, canvas_w = cls_scores[0].shape[2] * 8, cls_scores[0].shape[3] * 8
        for cls, reg, s in zip(cls_scores, bbox_preds, STRIDES):
            c, h, w = cls.shape[1:]
            sc = cls[b].permute(1, 2, 0).reshape(-1).sigmoid()
            idx = torch.nonzero(sc > cfg.score_thr).flatten()
            order = sc[idx].argsort(descending=True)[: cfg.nms_pre]
            idx = idx[order]
            for i in idx.tolist():
                prior, label = divmod(i, c)
                py, px = divmod(prior, w)
                d = reg[b, :, py, px]
                x1 = min(max(px * s - d[0].item(), 0), canvas_w)
                y1 = min(max(py * s - d[1].item(), 0), canvas_h)
                x2 = min(max(px * s + d[2].item(), 0), canvas_w)
                y2 = min(max(py * s + d[3].item(), 0), canvas_h)
                sw, sh = scale_wh[b].tolist()
                box = [x1 / sw, y1 / sh, x2 / sw, y2 / sh]
                if box[2] - box[0] > 0 and box[3] - box[1] > 0:
                    boxes.append(box)
                    scores.append(sc[i].item())
                    labels.append(label)
        keep_b, keep_s, keep_l = [], [], []
        if boxes:
            bx, scs, lb = torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels)
            for label in lb.unique().tolist():
                m = lb == label
                k = nms(bx[m], scs[m], cfg.iou_thr)
                keep_b.append(bx[m][k])
                keep_s.append(scs[m][k])
                keep_l.append(lb[m][k])
        if keep_b:
            bx, scs, lb = torch.cat(keep_b), torch.cat(keep_s), torch.cat(keep_l)
            order = scs.argsort(descending=True)[: cfg.max_per_img]
            bx, scs, lb = bx[order], scs[order], lb[order]
            w0, h0 = orig_wh[b].tolist()
            bx = torch.stack([bx[:, 0].clamp(0, w0), bx[:, 1].clamp(0, h0), bx[:, 2].clamp(0, w0),
                              bx[:, 3].clamp(0, h0)], 1)
            inside = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
            bx, scs, lb = bx[inside], scs[inside], lb[inside]
        else:
            bx, scs, lb = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
        out.append((bx, scs, lb))
    return out


def random_outputs(b, c, size, seed, logit_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    cls, reg = [], []
    for s in STRIDES:
        n = size // s
        cls.append(torch.randn(b, c, n, n, generator=g) * 2 - 4 + logit_shift)
        reg.append(torch.rand(b, 4, n, n, generator=g) * 6 * s)
    return cls, reg


def assert_same(ours, ref):
    for (b1, s1, l1), (b2, s2, l2) in zip(ours, ref):
        # compare as sets sorted by score: ties among equal scores may come out in either order
        o1, o2 = s1.argsort(descending=True, stable=True), s2.argsort(descending=True, stable=True)
        assert torch.allclose(s1[o1], s2[o2], atol=1e-6)
        assert torch.equal(l1[o1], l2[o2])
        assert torch.allclose(b1[o1], b2[o2], atol=1e-3)


@pytest.mark.parametrize("cfg", [TestConfig(), TestConfig.serving(), TestConfig(nms_pre=50, max_per_img=20)])
def test_batched_postprocess_equals_per_image_reference(cfg):
    cls, reg = random_outputs(3, 5, 128, seed=1)
    scale = torch.tensor([[1.0, 1.0], [0.5, 0.5], [128 / 300, 80 / 187]])
    orig = torch.tensor([[128.0, 128.0], [256.0, 200.0], [300.0, 187.0]])
    dets = postprocess(cls, reg, STRIDES, scale, orig, cfg)
    ours = dets.split(3)
    ref = reference(cls, reg, scale, orig, cfg)
    assert sum(len(s) for _, s, _ in ref) > 0
    assert_same(ours, ref)
    # images grouped in order, scores descending inside each image
    assert torch.equal(dets.image_index, dets.image_index.sort().values)


def test_no_boxes_above_threshold_gives_empty_results():
    cls, reg = random_outputs(2, 3, 64, seed=2, logit_shift=-20)
    dets = postprocess(cls, reg, STRIDES, torch.ones(2, 2), torch.full((2, 2), 64.0), TestConfig.serving())
    assert [len(s) for _, s, _ in dets.split(2)] == [0, 0]


def test_identical_boxes_of_one_class_are_all_suppressed_but_one():
    cls = [torch.full((1, 1, 8, 8), -10.0), torch.full((1, 1, 4, 4), -10.0), torch.full((1, 1, 2, 2), -10.0)]
    reg = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 2, 2)]
    # three priors of level 0 predict the same box (16, 16, 40, 40) with different scores
    for (y, x), logit in zip([(2, 2), (3, 3), (4, 4)], [1.0, 2.0, 3.0]):
        cls[0][0, 0, y, x] = logit
        reg[0][0, :, y, x] = torch.tensor([x * 8 - 16, y * 8 - 16, 40 - x * 8, 40 - y * 8], dtype=torch.float)
    dets = postprocess(cls, reg, STRIDES, torch.ones(1, 2), torch.full((1, 2), 64.0), TestConfig.serving())
    assert len(dets.scores) == 1
    assert dets.scores[0].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert dets.boxes[0].tolist() == pytest.approx([16, 16, 40, 40])


def test_same_box_in_different_classes_and_images_is_kept():
    cls = [torch.full((2, 3, 8, 8), -10.0), torch.full((2, 3, 4, 4), -10.0), torch.full((2, 3, 2, 2), -10.0)]
    reg = [torch.full((2, 4, 8, 8), 8.0), torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 2, 2)]
    cls[0][:, :, 3, 3] = 2.0  # every class fires at one prior in both images
    dets = postprocess(cls, reg, STRIDES, torch.ones(2, 2), torch.full((2, 2), 64.0), TestConfig.serving())
    per_image = dets.split(2)
    assert [sorted(lbl.tolist()) for _, _, lbl in per_image] == [[0, 1, 2], [0, 1, 2]]


def test_many_classes_and_max_per_img():
    cls, reg = random_outputs(2, 80, 256, seed=3, logit_shift=3)
    cfg = TestConfig(score_thr=0.05, max_per_img=37)
    dets = postprocess(cls, reg, STRIDES, torch.ones(2, 2), torch.full((2, 2), 256.0), cfg)
    assert [len(s) for _, s, _ in dets.split(2)] == [37, 37]
    assert_same(dets.split(2), reference(cls, reg, torch.ones(2, 2), torch.full((2, 2), 256.0), cfg))


@pytest.mark.parametrize("h,w", [(1, 1), (7, 1000), (1000, 7), (333, 517), (640, 640), (1080, 1920), (2001, 13)])
def test_letterbox_round_trip_maps_canvas_boxes_back_to_original_pixels(h, w):
    img = np.zeros((h, w, 3), np.uint8)
    canvas, info = letterbox(img, 640)
    nh, nw = resized_shape(h, w, 640)
    assert canvas.shape == (640, 640, 3)
    assert max(nh, nw) == 640
    assert (canvas[nh:] == 114).all() and (canvas[:, nw:] == 114).all()
    # the whole resized area maps back onto the whole original image
    corner = torch.tensor([[nw, nh]], dtype=torch.float32) / torch.tensor([[info.scale_w, info.scale_h]])
    assert corner[0].tolist() == pytest.approx([w, h], rel=1e-5)


def test_letterbox_matches_mmdetection_resize_rule():
    # s = min(640 / long, 640 / short); new = int(x * s + 0.5)
    assert resized_shape(480, 640, 640) == (480, 640)
    assert resized_shape(427, 640, 640) == (427, 640)
    assert resized_shape(500, 375, 640) == (640, 480)
    assert resized_shape(100, 333, 640) == (192, 640)


def test_detections_to_list_rounds_like_python_and_gives_plain_types():
    from model.inference.detections import Detections

    rng = np.random.default_rng(3)
    boxes = (rng.random((500, 4)) * 4000).astype(np.float32)
    scores = rng.random(500).astype(np.float32)
    labels = rng.integers(0, 80, 500)
    out = Detections(boxes, scores, labels, [f"c{i}" for i in labels]).to_list()
    assert [d["box"] for d in out] == [[round(float(v), 2) for v in b] for b in boxes]
    assert [d["score"] for d in out] == [round(float(s), 4) for s in scores]
    assert all(type(d["label"]) is int and type(d["score"]) is float for d in out)
    assert [d["class_name"] for d in out] == [f"c{i}" for i in labels]
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [])
    assert empty.to_list() == []


def test_letterbox_info_for_original_maps_a_reduced_images_boxes_to_the_original():
    # A 1280 x 960 original decoded at 1/4 (320 x 240), letterboxed to 160: 160 x 120 on the canvas.
    _, info = letterbox(np.zeros((240, 320, 3), np.uint8), 160)
    full = info.for_original(960, 1280)
    assert (full.orig_h, full.orig_w) == (960, 1280)
    assert full.scale_w == pytest.approx(160 / 1280) and full.scale_h == pytest.approx(120 / 960)


def crowded(counts, classes, seed, jitter=6.0, spread=20.0):
    """Boxes around a few centres per image (so NMS suppresses a lot), distinct scores, random classes."""
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    img = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    centre = torch.randint(0, 6, (n, 2), generator=g).float() * 60 + 40
    half = torch.rand(n, 2, generator=g) * spread + 15
    shift = torch.randn(n, 2, generator=g) * jitter
    box = torch.cat([centre + shift - half, centre + shift + half], 1)
    score = torch.randperm(n, generator=g).float() / n * 0.9 + 0.05  # no ties: the order is unambiguous
    label = torch.randint(0, classes, (n,), generator=g)
    return box, score, img, label


def nms_over_all(box, score, img, label, classes, iou, caps):
    """The definition: torchvision's class-aware NMS over every candidate, then each image's best."""
    keep = batched_nms(box, score, img * classes + label, iou)
    return best_per_image(keep, img, caps)


@pytest.mark.parametrize("counts,caps", [([1500, 0, 700, 3000], [100, 5, 1000, 50]),
                                         ([2500, 2500], [0, 300]), ([1200], [1])])
def test_nms_top_keeps_what_nms_over_all_candidates_keeps(counts, caps):
    box, score, img, label = crowded(counts, classes=5, seed=len(counts))
    assert box.shape[0] > ONE_CALL_MAX  # the per-image prefix path, not the single call
    caps = torch.tensor(caps)
    got = nms_top(box, score, img, label, 5, 0.6, caps)
    want = nms_over_all(box, score, img, label, 5, 0.6, caps)
    assert torch.equal(got, want)
    assert torch.bincount(img[got], minlength=len(counts)).le(caps).all()


def test_nms_top_grows_the_prefix_when_it_keeps_too_few():
    """An image whose 400 best candidates are near-copies of 3 boxes, and whose other 2600 are apart from
    each other: the first prefix keeps 3 of the cap of 200, so it must grow before it can stop."""
    g = torch.Generator().manual_seed(7)
    copies = torch.tensor([[10.0, 10, 50, 50], [100, 10, 140, 50], [10, 100, 50, 140]]).repeat(134, 1)[:400]
    copies = copies + torch.rand(400, 4, generator=g)
    grid = torch.stack(torch.meshgrid(torch.arange(52.0), torch.arange(50.0), indexing="ij"), -1).reshape(-1, 2)
    apart = torch.cat([grid * 20 + 200, grid * 20 + 210], 1)  # 10x10 boxes 20 px apart: no overlap
    box = torch.cat([copies, apart])
    score = torch.cat([torch.linspace(0.99, 0.6, 400), torch.linspace(0.59, 0.1, 2600)])
    img, label = torch.zeros(3000, dtype=torch.long), torch.zeros(3000, dtype=torch.long)
    cap = 200
    assert 2 * cap >= PREFIX_MIN  # so the first prefix is exactly the 400 copies
    assert batched_nms(box[:400], score[:400], label[:400], 0.6).numel() == 3
    caps = torch.tensor([cap])
    got = nms_top(box, score, img, label, 1, 0.6, caps)
    assert got.numel() == cap
    assert torch.equal(got, nms_over_all(box, score, img, label, 1, 0.6, caps))


def test_nms_top_with_few_candidates_is_one_call_with_the_same_answer():
    box, score, img, label = crowded([300, 200], classes=3, seed=3)
    caps = torch.tensor([10, 1000])
    assert torch.equal(nms_top(box, score, img, label, 3, 0.5, caps),
                       nms_over_all(box, score, img, label, 3, 0.5, caps))
