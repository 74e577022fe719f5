"""`rtmdet serve --model NAME=PATH,accelerate=openvino-int8,calibration=FOLDER`: a real server on 127.0.0.1
quantises the shipped model on the folder's images and answers with the shapes eager finds; without the folder
it does not start, and says why in one line."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from svc_helpers import REPO, ServerProcess, jpeg

from model import Detector, TestConfig
from model.data.shapes import make_shapes_dataset
from model.inference.detector import load_image
from service.client import HttpDetectorClient
from service.model_specs import parse_model_option
from service.settings import ServiceSettings

WEIGHTS = REPO / "weights" / "rtmdet_tiny_shapes.pth"
SIZE = 160


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, n_train=12, n_val=2, seed=11, img_size=SIZE)
    return root


def test_model_option_takes_a_calibration_folder():
    spec = parse_model_option(f"q={WEIGHTS},accelerate=openvino-int8,calibration=/data/calib", ServiceSettings())
    assert (spec.accelerate, spec.calibration) == ("openvino-int8", Path("/data/calib"))
    with pytest.raises(ValueError, match="accelerate"):
        parse_model_option(f"q={WEIGHTS},accelerate=openvino-int4", ServiceSettings())


@pytest.mark.slow  # 31 s of the default run's 15 minutes; the int8 runner's detections against eager's are tested
# in it (tests/model/test_low_precision.py), and the --model option that names it here
def test_an_int8_model_is_served_and_finds_the_shapes_eager_finds(shapes, tmp_path):
    srv = ServerProcess(WEIGHTS, tmp_path / "server.log", "--model",
                        f"q={WEIGHTS},img_size={SIZE},accelerate=openvino-int8,calibration={shapes / 'train'}",
                        weights_flag=False)
    eager = Detector.from_checkpoint(WEIGHTS, test_cfg=TestConfig.serving(input_size=SIZE), accelerate="eager")
    with srv:
        srv.wait_ready()
        with HttpDetectorClient(srv.http) as client:
            for path in sorted((shapes / "val").glob("*.jpg")):
                image = load_image(path)
                served = client.detect(jpeg(image, 98), model="q")["detections"]
                (want,) = eager([cv2.imdecode(np.frombuffer(jpeg(image, 98), np.uint8), cv2.IMREAD_COLOR)])
                confident = [i for i in range(len(want)) if want.scores[i] >= 0.5]
                assert confident, "no confident shape: the check would be empty"
                for i in confident:
                    assert any(d["label"] == int(want.labels[i]) and iou(d["box"], want.boxes[i]) >= 0.9
                               for d in served), (path.name, want.labels[i], want.boxes[i], served)
    assert "openvino-int8: quantised by NNCF on 12 calibration images at 160" in (tmp_path / "server.log").read_text()


def test_an_int8_model_without_calibration_images_does_not_start_and_says_why(tmp_path):
    srv = ServerProcess(WEIGHTS, tmp_path / "server.log", "--model",
                        f"q={WEIGHTS},img_size={SIZE},accelerate=openvino-int8", weights_flag=False)
    with srv:
        assert srv.wait_exit(timeout=120) != 0
    assert "openvino-int8 needs calibration images" in (tmp_path / "server.log").read_text()


def iou(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
