"""Sparse box regression in the service (RTMDET_SPARSE_REGRESSION, on by default; per model
`--model ...,sparse_regression=false`): a real `rtmdet serve` on 127.0.0.1 serving the shipped model twice, with
and without it, answers the same detections over HTTP and gRPC, and says which runs which."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from svc_helpers import REPO, ServerProcess, jpeg, serving

from model import Detector
from service.client import GrpcDetectorClient, HttpDetectorClient

SHIPPED = REPO / "weights" / "rtmdet_tiny_shapes.pth"


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "sparse.log"
    srv = ServerProcess(SHIPPED, log, "--model", f"sparse={SHIPPED}", "--model",
                        f"dense={SHIPPED},sparse_regression=false", weights_flag=False,
                        RTMDET_INPUT_SIZE="320", RTMDET_MAX_BATCH_SIZE="4")
    with serving(srv) as s:
        yield s


def boxes_of(answer: dict) -> tuple[list, np.ndarray, np.ndarray]:
    dets = answer["detections"]
    return ([d["class_name"] for d in dets], np.array([d["score"] for d in dets]),
            np.array([d["box"] for d in dets]).reshape(-1, 4))


def test_both_ways_answer_the_same_detections(two_ways):
    image = cv2.imread(str(REPO / "examples" / "shapes.jpg"))
    data = jpeg(image)
    want = Detector.from_checkpoint(SHIPPED)([cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)])[0]
    assert len(want.boxes) >= 5  # real detections
    with HttpDetectorClient(two_ways.http) as h, GrpcDetectorClient(two_ways.grpc) as g:
        listed = {m["model"]: m for m in h.models()}
        assert listed["sparse"]["sparse_regression"] is True and listed["dense"]["sparse_regression"] is False
        assert g.model("sparse")["sparse_regression"] is True and g.model("dense")["sparse_regression"] is False
        answers = [client.detect(data, model=name) for client in (h, g) for name in ("sparse", "dense")]
        # A per-request cut: another threshold and two classes.
        cut = [client.detect(data, model=name, score_threshold=0.5, classes=["circle", "star"])
               for client in (h, g) for name in ("sparse", "dense")]
    for group, n in ((answers, len(want.boxes)), (cut, None)):
        names0, scores0, boxes0 = boxes_of(group[0])
        assert n is None or len(names0) == n
        for other in group[1:]:
            names, scores, boxes = boxes_of(other)
            assert names == names0
            np.testing.assert_allclose(scores, scores0, atol=1e-3)
            np.testing.assert_allclose(boxes, boxes0, atol=0.02)  # JSON rounds to 2 decimals
    assert {n for n in boxes_of(cut[0])[0]} <= {"circle", "star"}
    np.testing.assert_allclose(boxes_of(answers[0])[2], want.boxes, atol=0.02)
