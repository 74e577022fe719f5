"""YOLO and Pascal VOC sets read as COCO: boxes equal what was written (in pixels), negatives kept, every malformed
file an error naming the file and line, the layout recognised, and `rtmdet convert` round-trips."""
import json
from pathlib import Path

import numpy as np
import pytest

from model.data.formats import convert_to_coco, detect_format, open_split
from model.data.yolo import label_file_for
from service.cli import main as rtmdet
from tests.model.data.dataset_writers import VOC_SCENES, write_voc_set, write_yolo_set


def _by_file(dataset):
    """{file name: (boxes, labels, Sample)} of every image of a CocoDetection."""
    out = {}
    for i in range(len(dataset)):
        boxes, labels = dataset.annotations(i)
        out[dataset.image_path(i).name] = (boxes, labels, dataset[i])
    return out


# ------------------------------------------------------------------------------------------------ YOLO
@pytest.mark.parametrize("names_as_dict", [False, True])
def test_yolo_boxes_read_equal_boxes_written_in_pixels(tmp_path, names_as_dict):
    written = write_yolo_set(tmp_path, names_as_dict=names_as_dict)
    for split in ("train", "val"):
        ds = open_split(tmp_path, split, training=split == "train")
        assert ds.class_names == ["cat", "dog"]
        got = _by_file(ds)
        assert sorted(got) == sorted(r.path.name for r in written[split])  # negatives kept, even in training
        for rec in written[split]:
            boxes, labels, sample = got[rec.path.name]
            # 6 written decimals of a normalised coordinate are < 1e-4 px on these sizes
            np.testing.assert_allclose(boxes, np.array(rec.boxes, np.float32).reshape(-1, 4), atol=1e-3)
            assert labels.tolist() == rec.labels
            assert sample.img.shape == (rec.height, rec.width, 3)
            np.testing.assert_array_equal(sample.boxes, boxes)
    assert any(not r.boxes for r in written["train"])  # the set really has a negative in training


def test_yolo_yaml_elsewhere_with_relative_path(tmp_path):
    (tmp_path / "cfg").mkdir()
    write_yolo_set(tmp_path, yaml_path=str(tmp_path / "cfg" / "shapes.yaml"))  # `path: ..`
    yaml_file = tmp_path / "cfg" / "shapes.yaml"
    assert detect_format(yaml_file) == "yolo"
    assert len(open_split(yaml_file, "train")) == 3


def test_image_size_is_what_cv2_decodes_exif_rotation_included(tmp_path):
    from PIL import Image

    from model.data.instances import image_size

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 24), (10, 20, 30)).save(tmp_path / "phone.jpg", exif=exif)
    import cv2
    assert cv2.imread(str(tmp_path / "phone.jpg")).shape[:2] == (40, 24)  # OpenCV applies the rotation
    assert image_size(tmp_path / "phone.jpg") == (24, 40)  # (width, height) of what cv2 returns


def test_yolo_names_with_quoted_keys(tmp_path):
    write_yolo_set(tmp_path)
    (tmp_path / "data.yaml").write_text("train: images/train\nnames:\n  '0': cat\n  '1': dog\n")
    assert open_split(tmp_path, "train").class_names == ["cat", "dog"]


def test_yolo_label_path_rule():
    assert label_file_for(Path("/d/images/train/a.b.jpg")) == Path("/d/labels/train/a.b.txt")
    assert label_file_for(Path("/images/x/images/y/c.png")) == Path("/images/x/labels/y/c.txt")  # the last one


def _label(root, split, i):
    return root / "labels" / split / f"img{i}.txt"


YOLO_DEFECTS = [
    # (mutate the written set, what the error must say); `{f}` is the offending file
    (lambda r: _label(r, "train", 0).write_text("0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.1 0.1\n"),
     "{f}:2: class 2 is not an index into the 2 `names`", lambda r: _label(r, "train", 0)),
    (lambda r: _label(r, "train", 1).write_text("1 0.5 0.5 0.2\n"), "{f}:1: want 5 fields",
     lambda r: _label(r, "train", 1)),
    (lambda r: _label(r, "train", 1).write_text("1 0.5 0.5 0.2 0.2 0.3 0.4\n"), "segmentation polygons",
     lambda r: _label(r, "train", 1)),
    (lambda r: _label(r, "train", 0).write_text("\n0 0.95 0.5 0.2 0.2\n"), "{f}:2: box outside the image",
     lambda r: _label(r, "train", 0)),
    (lambda r: _label(r, "train", 0).write_text("0 0.5 0.5 0 0.2\n"), "{f}:1: empty box",
     lambda r: _label(r, "train", 0)),
    (lambda r: _label(r, "train", 0).write_text("cat 0.5 0.5 0.2 0.2\n"), "{f}:1: not numbers",
     lambda r: _label(r, "train", 0)),
    (lambda r: _label(r, "train", 0).write_text("0.5 0.5 0.5 0.2 0.2\n"), "{f}:1: class 0.5",
     lambda r: _label(r, "train", 0)),
    (lambda r: (r / "images" / "train" / "img1.png").unlink(), "{f}: label file without an image",
     lambda r: _label(r, "train", 1)),
    (lambda r: (r / "images" / "val" / "img3.png").unlink(), "{f}:1: listed image './images/val/img3.png' does not",
     lambda r: r / "val.txt"),
    (lambda r: (r / "images" / "train" / "img0.png").write_bytes(b"not an image"), "{f}: not a readable image",
     lambda r: r / "images" / "train" / "img0.png"),
    (lambda r: (r / "data.yaml").write_text("train: images/train\nnames: {0: a, 2: b}\n"),
     "{f}: `names` keys must be the class indices 0..1", lambda r: r / "data.yaml"),
    (lambda r: (r / "data.yaml").write_text("train: images/train\nnames: [a, b\n"), "{f}:3: not valid YAML",
     lambda r: r / "data.yaml"),
    (lambda r: (r / "data.yaml").write_text("train: nowhere\nnames: [a, b]\n"), "{f}: `train` entry 'nowhere'",
     lambda r: r / "data.yaml"),
]


@pytest.mark.parametrize("mutate,message,culprit", YOLO_DEFECTS)
def test_yolo_malformed_file_is_an_error_naming_file_and_line(tmp_path, mutate, message, culprit):
    write_yolo_set(tmp_path)
    mutate(tmp_path)
    split = "val" if "val" in message else "train"
    with pytest.raises(ValueError) as exc:
        open_split(tmp_path, split)
    assert message.format(f=culprit(tmp_path)) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_yolo_missing_split_is_file_not_found(tmp_path):
    write_yolo_set(tmp_path)
    with pytest.raises(FileNotFoundError, match="no `test` split"):
        open_split(tmp_path, "test")


# ------------------------------------------------------------------------------------------------ VOC
def test_voc_boxes_read_equal_boxes_written_in_pixels(tmp_path):
    splits = write_voc_set(tmp_path)
    for split in ("train", "val"):
        ds = open_split(tmp_path, split, training=split == "train")
        assert ds.class_names == ["cat", "dog", "kite"]  # not the 20 VOC classes: the sorted names found
        got = _by_file(ds)
        assert sorted(got) == sorted(f"{s[0]}.jpg" for s in splits[split])
        for image_id, w, h, objects in splits[split]:
            boxes, labels, sample = got[f"{image_id}.jpg"]
            # VOC's 1-based inclusive indices xmin..xmax are the continuous box [xmin - 1, xmax]
            kept = [o for o in objects if not o[5]]
            want = [(max(x1 - 1, 0), max(y1 - 1, 0), x2, y2) for _, x1, y1, x2, y2, _ in kept]
            np.testing.assert_array_equal(boxes, np.array(want, np.float32).reshape(-1, 4))
            assert [ds.class_names[i] for i in labels] == [o[0] for o in kept]
            assert sample.img.shape == (h, w, 3)
            # difficult objects stay in the annotations as crowd boxes: ignored by training and by the evaluation
            anns = ds.coco.imgToAnns[sample.image_id]
            assert sorted(a["iscrowd"] for a in anns) == sorted(int(o[5]) for o in objects)


def test_voc_labels_file_and_standard_classes(tmp_path):
    write_voc_set(tmp_path / "a")
    (tmp_path / "a" / "labels.txt").write_text("kite\ndog\ncat\nbird\n")
    assert open_split(tmp_path / "a", "train").class_names == ["kite", "dog", "cat", "bird"]
    from model.data.voc import VOC_CLASSES
    scenes = [(f"img{i}", 40, 40, [(name, 1, 1, 20, 20, False)]) for i, name in enumerate(VOC_CLASSES)]
    write_voc_set(tmp_path / "b", n_train=20, scenes=scenes[::-1])
    assert open_split(tmp_path / "b", "train").class_names == list(VOC_CLASSES)  # the standard order


def _xml(root, i):
    return root / "Annotations" / f"{VOC_SCENES[i][0]}.xml"


VOC_DEFECTS = [
    (lambda r: _xml(r, 1).write_text(""), "{f}: not valid XML", lambda r: _xml(r, 1)),
    (lambda r: _xml(r, 1).write_text("<annotation><object>"), "{f}: not valid XML", lambda r: _xml(r, 1)),
    (lambda r: _xml(r, 0).unlink(), "{f}:1: no annotation file",
     lambda r: r / "ImageSets" / "Main" / "train.txt"),
    (lambda r: (r / "JPEGImages" / f"{VOC_SCENES[1][0]}.jpg").unlink(), "{f}: image missing", lambda r: _xml(r, 1)),
    (lambda r: _xml(r, 1).write_text(_xml(r, 1).read_text().replace("<xmax>45", "<xmax>51")),
     "{f}: object 0 (cat): box (10, 12, 51, 66) outside the 50x70 image", lambda r: _xml(r, 1)),
    (lambda r: _xml(r, 1).write_text(_xml(r, 1).read_text().replace("<ymin>12", "<ymin>x")),
     "{f}: object 0 (cat): <ymin> is 'x', want a number", lambda r: _xml(r, 1)),
    (lambda r: _xml(r, 1).write_text(_xml(r, 1).read_text().replace("<name>cat</name>", "")),
     "{f}: object 0 has no <name>", lambda r: _xml(r, 1)),
    (lambda r: _xml(r, 1).write_text(_xml(r, 1).read_text().replace("<width>50", "<width>500")),
     "{f}: <size> says 500x70 but", lambda r: _xml(r, 1)),
    (lambda r: (r / "labels.txt").write_text("dog\nkite\n"), "{f}: object 0 (cat): class not in the 2 class names",
     lambda r: _xml(r, 1)),
    (lambda r: (r / "ImageSets" / "Main" / "train.txt").write_text("a b\n"), "{f}:1: want one image id per line",
     lambda r: r / "ImageSets" / "Main" / "train.txt"),
]


@pytest.mark.parametrize("mutate,message,culprit", VOC_DEFECTS)
def test_voc_malformed_file_is_an_error_naming_file_and_entry(tmp_path, mutate, message, culprit):
    write_voc_set(tmp_path)
    mutate(tmp_path)
    with pytest.raises(ValueError) as exc:
        open_split(tmp_path, "train")
    assert message.format(f=culprit(tmp_path)) in str(exc.value)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------------ layouts, convert
def test_layout_is_recognised(tmp_path):
    write_yolo_set(tmp_path / "yolo")
    write_voc_set(tmp_path / "voc")
    convert_to_coco(tmp_path / "voc", tmp_path / "coco")
    assert [detect_format(tmp_path / n) for n in ("yolo", "voc", "coco")] == ["yolo", "voc", "coco"]
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a dataset layout"):
        detect_format(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no data.yaml"):  # --format forces the reader
        open_split(tmp_path / "voc", "train", fmt="yolo")


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_convert_to_coco_round_trips(tmp_path, fmt):
    (write_yolo_set if fmt == "yolo" else write_voc_set)(tmp_path / "src")
    assert rtmdet(["convert", "--to", "coco", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "annotations").iterdir()) == \
        ["instances_train.json", "instances_val.json"]
    for split in ("train", "val"):
        src, out = open_split(tmp_path / "src", split), open_split(tmp_path / "out", split)
        assert detect_format(tmp_path / "out") == "coco"
        assert out.class_names == src.class_names
        a, b = _by_file(src), _by_file(out)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name][0], b[name][0])
            np.testing.assert_array_equal(a[name][1], b[name][1])
            np.testing.assert_array_equal(a[name][2].img, b[name][2].img)  # the same image bytes, copied
        assert json.loads((tmp_path / "out" / "annotations" / f"instances_{split}.json").read_text())["annotations"] \
            == src.coco.dataset["annotations"]  # crowd (difficult) flags and all


def test_convert_refuses_a_broken_set_and_a_used_folder(tmp_path, capsys):
    write_yolo_set(tmp_path / "src")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert rtmdet(["convert", "--to", "coco", str(tmp_path / "src"), str(tmp_path / "used")]) == 2
    assert "not empty" in capsys.readouterr().err
    _label(tmp_path / "src", "train", 0).write_text("5 0.5 0.5 0.1 0.1\n")
    assert rtmdet(["convert", "--to", "coco", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert f"{_label(tmp_path / 'src', 'train', 0)}:1: class 5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is written
