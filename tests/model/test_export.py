"""ONNX export: onnxruntime agrees with PyTorch, the batch axis is really dynamic, decoding inside the
graph gives the detector's boxes, and `rtmdet export` writes a Triton repository ready to mount."""
import json

import numpy as np
import onnx
import pytest
import torch

from model import Detector, TestConfig, build_rtmdet, save_checkpoint
from model.checkpoint import make_meta
from model.export import (
    ExportableRTMDet,
    ExportReport,
    compare_with_torch,
    example_batch,
    export_onnx,
    read_onnx_metadata,
)
from model.nn.rtmdet import fused_for_inference
from model.testing import fill_deterministic
from model.triton_repo import TritonModelConfig, triton_config_pbtxt
from service.cli import main as rtmdet_main

SIZE = 128  # small canvas: the graph is the same at 640, only the spatial sizes change
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def net():
    """Seeded weights with logits and distances of a real detector's magnitude, so diffs mean something."""
    m = fill_deterministic(build_rtmdet("tiny", num_classes=3), 3)
    with torch.no_grad():
        for conv in m.bbox_head.rtm_cls:
            conv.weight.mul_(30.0)
        for conv in m.bbox_head.rtm_reg:
            conv.bias.fill_(3.0)
    return m.eval()


@pytest.fixture(scope="module")
def heads_onnx(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "heads.onnx"
    report = export_onnx(net, path, CLASSES, input_size=SIZE, dynamic_batch=True)
    return path, report


def test_heads_export_matches_pytorch_within_tolerance_at_another_batch_size(heads_onnx):
    path, report = heads_onnx
    assert report.passed and report.tolerance == 1e-4
    assert set(report.peak_rel_diff) == {"cls_s8", "cls_s16", "cls_s32", "reg_s8", "reg_s16", "reg_s32"}
    assert min(report.max_ref_abs.values()) > 1.0
    assert max(report.peak_rel_diff.values()) < 1e-4
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [SIZE, SIZE, 3]


def test_parity_check_fails_for_a_different_network(heads_onnx, net):
    path, _ = heads_onnx
    other = fill_deterministic(build_rtmdet("tiny", num_classes=3), 4).eval()
    reference = ExportableRTMDet(fused_for_inference(other), other.bbox_head.strides).eval()
    report = ExportReport(str(path), "heads", False, True, SIZE, 1e-4)
    compare_with_torch(path, reference, example_batch(1, SIZE, 7), report)
    assert not report.passed and max(report.peak_rel_diff.values()) > 0.01
    assert "parity FAILED" in report.summary()


def large_activation_model(seed: int = 3) -> torch.nn.Module:
    """Head features in the 1e4s and outputs in the 1e5s (as real weights can give): the rounding of a
    float32 sum is relative to its terms, so outputs near zero carry absolute errors far above 1e-3 even
    when the export is right."""
    m = fill_deterministic(build_rtmdet("tiny", num_classes=3), seed)
    with torch.no_grad():
        for stack in [*m.bbox_head.cls_convs, *m.bbox_head.reg_convs]:
            for conv_module in stack:
                conv_module.conv.weight.mul_(10.0)
        for conv in [*m.bbox_head.rtm_cls, *m.bbox_head.rtm_reg]:
            conv.weight.mul_(0.04)
    return m.eval()


def test_export_of_large_activation_weights_is_accepted_with_its_figure(tmp_path, capsys):
    weights = tmp_path / "large.pth"
    save_checkpoint(weights, large_activation_model().state_dict(), make_meta(CLASSES))
    out = tmp_path / "large.onnx"
    rc = rtmdet_main(["export", "--weights", str(weights), "--out", str(out), "--img-size", str(SIZE)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["passed"] and 3e4 < max(report["max_ref_abs"].values()) < 1e6
    assert max(report["max_abs_diff"].values()) > 1e-2  # the old element-wise atol 1e-3 + rtol 1e-3 refused it
    assert max(report["peak_rel_diff"].values()) < 1e-4
    assert "parity passed" in captured.err and "of its peak" in captured.err


def test_a_wrong_large_activation_export_is_still_refused(tmp_path):
    """The same large outputs, but the file holds other weights: off by far more than the bound."""
    path = tmp_path / "wrong.onnx"
    export_onnx(large_activation_model(3), path, CLASSES, input_size=SIZE, check=False)
    other = large_activation_model(4)
    reference = ExportableRTMDet(fused_for_inference(other), other.bbox_head.strides).eval()
    report = ExportReport(str(path), "heads", False, False, SIZE, 1e-4)
    compare_with_torch(path, reference, example_batch(1, SIZE, 7), report)
    assert not report.passed and max(report.peak_rel_diff.values()) > 0.01


def test_metadata_names_the_model(heads_onnx):
    meta = read_onnx_metadata(heads_onnx[0])
    assert json.loads(meta["rtmdet.classes"]) == CLASSES
    assert meta["rtmdet.size"] == "tiny" and meta["rtmdet.input_size"] == str(SIZE)
    assert meta["rtmdet.layout"] == "heads" and json.loads(meta["rtmdet.strides"]) == [8, 16, 32]


def test_fp16_export_stays_within_fp16_tolerance_of_float32_pytorch(net, tmp_path):
    report = export_onnx(net, tmp_path / "half.onnx", CLASSES, input_size=SIZE, fp16=True)
    assert report.passed and report.fp16 and report.tolerance == 1e-2
    assert 0 < max(report.peak_rel_diff.values()) < 1e-2  # half precision: not exact, within its bound


def test_decoded_export_gives_the_detectors_best_box(net, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "decoded.onnx"
    report = export_onnx(net, path, CLASSES, input_size=SIZE, layout="decoded")
    assert report.passed
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)  # canvas-sized: letterbox is the identity
    boxes, scores = ort.InferenceSession(str(path)).run(None, {"images": image[None]})
    n_priors = sum((SIZE // s) ** 2 for s in (8, 16, 32))
    assert boxes.shape == (1, n_priors, 4) and scores.shape == (1, n_priors, 3)
    detector = Detector(net, CLASSES, device="cpu", test_cfg=TestConfig(input_size=SIZE, score_thr=0.0))
    (dets,) = detector([image])
    # The detector drops empty boxes before picking its best, so do the same here.
    valid = (boxes[0, :, 2] > boxes[0, :, 0]) & (boxes[0, :, 3] > boxes[0, :, 1])
    prior, label = np.unravel_index(np.argmax(np.where(valid[:, None], scores[0], -1)), scores[0].shape)
    assert dets.labels[0] == label
    assert np.isclose(dets.scores[0], scores[0, prior, label], atol=1e-5)
    assert np.allclose(dets.boxes[0], boxes[0, prior], atol=1e-3)


def test_triton_config_needs_a_dynamic_batch(net, tmp_path):
    path = tmp_path / "static.onnx"
    export_onnx(net, path, CLASSES, input_size=SIZE, check=False)
    with pytest.raises(ValueError, match="dynamic batch"):
        triton_config_pbtxt(path, TritonModelConfig())


def test_cli_writes_a_triton_repository(net, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    save_checkpoint(weights, net.state_dict(), make_meta(CLASSES))
    repo = tmp_path / "repo"
    rc = rtmdet_main(["export", "--weights", str(weights), "--format", "triton", "--out", str(repo),
                      "--img-size", str(SIZE), "--max-batch-size", "8"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["dynamic_batch"]
    config = (repo / "rtmdet" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 8" in config
    assert "dynamic_batching {" in config and "preferred_batch_size: [ 4, 8 ]" in config
    assert "instance_group [ { count: 1 kind: KIND_GPU } ]" in config
    assert f'name: "images" data_type: TYPE_UINT8 dims: [ {SIZE}, {SIZE}, 3 ]' in config
    assert f'name: "cls_s8" data_type: TYPE_FP32 dims: [ 3, {SIZE // 8}, {SIZE // 8} ]' in config
    assert (repo / "rtmdet" / "1" / "model.onnx").is_file()
    assert "class TritonPythonModel" in (repo / "rtmdet" / "1" / "model.py").read_text()


def test_cli_reports_a_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, bad)
    rc = rtmdet_main(["export", "--weights", str(bad), "--out", str(tmp_path / "x.onnx")])
    assert rc == 2 and "does not fit the model" in capsys.readouterr().err
