"""CocoDetection: label mapping, crowd and empty-image handling, malformed-file errors."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from model.data.coco import CocoDetection


def _write(tmp_path, data, images=(1, 2, 3)):
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    for i in images:
        cv2.imwrite(str(img_dir / f"{i}.png"), np.full((20, 30, 3), i * 10, np.uint8))
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, img_dir


def _data():
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in (3, 1, 2)],
        # Non-contiguous, unsorted category ids: labels follow ascending id.
        "categories": [{"id": 7, "name": "seven"}, {"id": 2, "name": "two"}, {"id": 90, "name": "ninety"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0, "area": 50},
            {"id": 2, "image_id": 1, "category_id": 90, "bbox": [0, 0, 4, 4], "iscrowd": 0, "area": 16},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [5, 5, 9, 9], "iscrowd": 1, "area": 81},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [3, 3, 2, 2], "iscrowd": 1, "area": 4},
            {"id": 5, "image_id": 3, "category_id": 2, "bbox": [2, 4, 6, 8], "area": 48},
        ],
    }


def test_labels_are_contiguous_in_category_id_order(tmp_path):
    ds = CocoDetection(*_write(tmp_path, _data()))
    assert ds.class_names == ["two", "seven", "ninety"]
    assert ds.label_to_cat_id == [2, 7, 90]
    s = ds[ds.image_ids.index(1)]
    np.testing.assert_array_equal(s.labels, [1, 2])
    np.testing.assert_allclose(s.boxes, [[1, 2, 11, 7], [0, 0, 4, 4]])
    assert s.boxes.dtype == np.float32 and s.labels.dtype == np.int64
    assert s.img.shape == (20, 30, 3) and s.img.dtype == np.uint8 and s.image_id == 1
    assert int(s.img[0, 0, 0]) == 10  # the file named for image 1 was read
    assert sorted(ds.coco.getCatIds()) == [2, 7, 90] and len(ds.coco.getAnnIds()) == 5


def test_crowd_boxes_are_ignored_and_empty_images_filtered(tmp_path):
    ds = CocoDetection(*_write(tmp_path, _data()))
    assert ds.image_ids == [1, 3]  # image 2 has only a crowd box
    assert len(ds) == 2
    np.testing.assert_array_equal(ds[1].labels, [0])


def test_empty_images_kept_when_not_filtering(tmp_path):
    ds = CocoDetection(*_write(tmp_path, _data()), filter_empty=False)
    assert ds.image_ids == [1, 2, 3]
    s = ds[1]
    assert s.boxes.shape == (0, 4) and s.labels.shape == (0,)


@pytest.mark.parametrize(("mutate", "entry"), [
    (lambda d: d["annotations"][1].update(bbox=[0, 0, 4]), "annotations[1]"),
    (lambda d: d["annotations"][2].update(category_id=5), "annotations[2]"),
    (lambda d: d["annotations"][0].update(image_id=99), "annotations[0]"),
    (lambda d: d["annotations"][4].update(bbox=[1, 1, -3, 2]), "annotations[4]"),
    (lambda d: d["annotations"][3].pop("bbox"), "annotations[3]"),
    (lambda d: d["images"][2].pop("file_name"), "images[2]"),
    (lambda d: d["categories"][1].update(id="2"), "categories[1]"),
    (lambda d: d.pop("annotations"), "annotations"),
])
def test_malformed_annotation_file_names_file_and_entry(tmp_path, mutate, entry):
    data = _data()
    mutate(data)
    ann, img_dir = _write(tmp_path, data)
    with pytest.raises(ValueError) as err:
        CocoDetection(ann, img_dir)
    assert str(ann) in str(err.value) and entry in str(err.value)


def test_invalid_json_names_the_file(tmp_path):
    ann = tmp_path / "broken.json"
    ann.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        CocoDetection(ann, tmp_path)


def test_missing_image_file_is_named(tmp_path):
    ann, img_dir = _write(tmp_path, _data(), images=(1, 2))
    ds = CocoDetection(ann, img_dir)
    with pytest.raises(FileNotFoundError, match="3.png"):
        ds[ds.image_ids.index(3)]
