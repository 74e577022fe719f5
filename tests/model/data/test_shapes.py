"""The synthetic shapes set: COCO format, deterministic for a seed, learnable boxes."""
from __future__ import annotations

import json

import numpy as np

from model.data.coco import CocoDetection
from model.data.shapes import SHAPE_CLASSES, ShapesConfig, draw_shapes_on, make_shapes_dataset
from service.cli import main as rtmdet_main


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    make_shapes_dataset(tmp_path / "a", 6, 2, seed=1, img_size=96)
    make_shapes_dataset(tmp_path / "b", 6, 2, seed=1, img_size=96)
    make_shapes_dataset(tmp_path / "c", 6, 2, seed=2, img_size=96)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 6 + 2 + 2
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a if k.endswith(".jpg")) == 8


def test_image_i_does_not_depend_on_split_sizes(tmp_path):
    make_shapes_dataset(tmp_path / "small", 2, 1, seed=4, img_size=80)
    make_shapes_dataset(tmp_path / "big", 5, 3, seed=4, img_size=80)
    small, big = _files(tmp_path / "small"), _files(tmp_path / "big")
    for name in ("train/000000.jpg", "train/000001.jpg", "val/000000.jpg"):
        assert small[name] == big[name]


def test_written_set_is_valid_coco_with_every_class(tmp_path):
    paths = make_shapes_dataset(tmp_path, 30, 4, seed=0, img_size=128)
    data = json.loads(paths["train"].read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPE_CLASSES)
    ds = CocoDetection(paths["train"], tmp_path / "train")
    assert ds.class_names == list(SHAPE_CLASSES) and len(ds) == 30
    seen, sizes = set(), []
    for i in range(len(ds)):
        s = ds[i]
        h, w = s.img.shape[:2]
        assert max(h, w) == 128 and min(h, w) >= 0.6 * 128 - 1
        assert (s.boxes[:, :2] >= 0).all() and (s.boxes[:, 2] <= w).all() and (s.boxes[:, 3] <= h).all()
        assert 1 <= len(s.boxes) <= 10
        seen.update(s.labels.tolist())
        sizes.extend(np.sqrt((s.boxes[:, 2] - s.boxes[:, 0]) * (s.boxes[:, 3] - s.boxes[:, 1])).tolist())
    assert seen == set(range(len(SHAPE_CLASSES)))
    assert min(sizes) < 20 and max(sizes) > 50  # small to large
    val = CocoDetection(paths["val"], tmp_path / "val")
    assert len(val) == 4


def test_boxes_are_the_tight_extent_of_the_drawn_shapes():
    # On a flat canvas the changed pixels are exactly the shapes: none may lie outside every box, and every box
    # must have changed pixels along each of its four sides (the box is not larger than the shape). Pixel i spans
    # [i, i+1], so a box covers pixels floor(x1) .. ceil(x2) - 1.
    cfg = ShapesConfig(img_size=160)
    for seed in range(6):
        img = np.full((120, 160, 3), 128, np.uint8)
        objects = draw_shapes_on(img, np.random.default_rng(seed), cfg)
        assert objects
        changed = np.abs(img.astype(np.int16) - 128).max(axis=2) > 0
        covered = np.zeros_like(changed)
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            ix1, iy1, ix2, iy2 = int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))
            covered[iy1:iy2, ix1:ix2] = True
            region = changed[iy1:iy2, ix1:ix2]
            assert region[:2].any() and region[-2:].any() and region[:, :2].any() and region[:, -2:].any(), obj.box
        assert (changed & ~covered).sum() == 0


def test_cli_writes_the_dataset(tmp_path, capsys):
    rc = rtmdet_main(["make-shapes-dataset", str(tmp_path / "out"), "--train", "3", "--val", "2", "--seed", "5",
                      "--img-size", "64"])
    assert rc == 0
    assert "wrote 3 train + 2 val images" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "train").glob("*.jpg"))) == 3
    assert len(json.loads((tmp_path / "out/annotations/instances_val.json").read_text())["images"]) == 2
