"""ONNX export of the network, checked against PyTorch with onnxruntime on the same input.

The exported graph takes what the service's preprocess already makes, a letterboxed uint8 BGR batch
(B, S, S, 3), and normalises inside the graph: a quarter of the bytes cross to the runtime (or over
the wire to Triton) compared with float input, and no caller can get the mean/std wrong.

Two output layouts:
- `heads` (default): per level, class logits (B, C, S/s, S/s) and ltrb pixel distances (B, 4, S/s, S/s),
  named `cls_s8`, `cls_s16`, `cls_s32`, `reg_s8`, ... exactly what `RTMDet.forward` returns, so the
  caller keeps the model's batched post-processing (score filter, top-k, NMS, rescale).
- `decoded`: box decoding inside the graph, `boxes` (B, N, 4) xyxy on the letterboxed canvas (clamped
  to it) and `scores` (B, N, C) sigmoid probabilities, N = all priors, for runtimes that bring their own NMS.

Facts about the model travel in the file's metadata (`rtmdet.*` keys), so a backend needs nothing else.
A Triton model repository around the file: `model.triton_repo`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.boxes import distance2bbox, grid_priors
from model.config import PIXEL_MEAN_BGR, PIXEL_STD_BGR
from model.nn.rtmdet import RTMDet, fused_for_inference

INPUT_NAME = "images"
LAYOUTS = ("heads", "decoded")
# The dynamo-based exporter writes opset 18 and up (ONNX Runtime >= 1.14, OpenVINO, Triton's ORT backend).
OPSET = 18

# Parity: per output, max |onnx - torch| / max |torch| (the error relative to the output's peak, as the
# MMDetection parity tests measure it), against the float32 PyTorch network. Element-wise relative error
# says nothing near zero crossings, and an absolute bound refuses correct exports of weights whose
# activations are large: the rounding of a sum scales with its terms, not with its (maybe cancelled) result.
# float32: both runtimes do the same maths in a different order (measured here: <= 3e-6 of the peak).
# float16: the half-precision graph against the float32 reference; half has an 11-bit mantissa and the
# error builds up over ~60 layers (measured: 2e-4 to 7e-4 of the peak on seeded tiny weights).
PEAK_TOLERANCE = {False: 1e-4, True: 1e-2}  # fp16 -> max |diff| / peak


def head_output_names(strides: Sequence[int]) -> list[str]:
    return [f"cls_s{s}" for s in strides] + [f"reg_s{s}" for s in strides]


def output_names(layout: str, strides: Sequence[int]) -> list[str]:
    return head_output_names(strides) if layout == "heads" else ["boxes", "scores"]


class ExportableRTMDet(nn.Module):
    """uint8 (B, S, S, 3) BGR -> the network's outputs in float32, normalisation inside."""

    def __init__(self, network: nn.Module, strides: Sequence[int], layout: str = "heads",
                 half: bool = False) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown output layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        self.network = network
        self.strides = tuple(strides)
        self.layout = layout
        self.half = half
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN_BGR).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", (1.0 / torch.tensor(PIXEL_STD_BGR)).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
        cls_scores, bbox_preds = self.network(x.half() if self.half else x)
        cls_scores = [c.float() for c in cls_scores]
        bbox_preds = [r.float() for r in bbox_preds]
        if self.layout == "heads":
            return (*cls_scores, *bbox_preds)
        return self._decode(cls_scores, bbox_preds, canvas=images.shape[1])

    def _decode(self, cls_scores, bbox_preds, canvas: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = cls_scores[0].shape[0]
        sizes = [(int(c.shape[2]), int(c.shape[3])) for c in cls_scores]
        # Shapes are static in the graph, so the priors fold into one constant.
        priors = grid_priors(sizes, self.strides, device=cls_scores[0].device)
        scores = torch.cat([c.permute(0, 2, 3, 1).reshape(b, -1, c.shape[1]) for c in cls_scores], 1).sigmoid()
        dist = torch.cat([r.permute(0, 2, 3, 1).reshape(b, -1, 4) for r in bbox_preds], 1)
        boxes = distance2bbox(priors[None, :, :2], dist).clamp(0, canvas)
        return boxes, scores


@dataclass
class ExportReport:
    """What was written and how closely onnxruntime agrees with PyTorch on the same input."""

    path: str
    layout: str
    fp16: bool
    dynamic_batch: bool
    input_size: int
    tolerance: float  # on max |diff| / max |reference|, per output
    dynamic_canvas: bool = False  # any height and width that are multiples of the largest stride
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    max_ref_abs: dict[str, float] = field(default_factory=dict)
    peak_rel_diff: dict[str, float] = field(default_factory=dict)
    passed: bool = False

    def summary(self) -> str:
        """One line: the worst output's error relative to its peak, against the bound."""
        if not self.peak_rel_diff:
            return f"{self.path}: not checked"
        name = max(self.peak_rel_diff, key=self.peak_rel_diff.get)
        verdict = "passed" if self.passed else "FAILED"
        return (f"{self.path}: parity {verdict}: worst output {name} differs from PyTorch by "
                f"{self.max_abs_diff[name]:.3g} at peak {self.max_ref_abs[name]:.3g} = "
                f"{self.peak_rel_diff[name]:.2e} of its peak (bound {self.tolerance:.0e})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def model_metadata(model: RTMDet, class_names: Sequence[str], input_size: int, layout: str, fp16: bool,
                   weights_sha256: str | None = None) -> dict[str, str]:
    meta = {
        "rtmdet.size": model.size,
        "rtmdet.input_size": str(input_size),
        "rtmdet.strides": json.dumps(list(model.bbox_head.strides)),
        "rtmdet.layout": layout,
        "rtmdet.input_format": "uint8 BGR NHWC letterboxed, pad 114",
        "rtmdet.dtype": "float16" if fp16 else "float32",
        "rtmdet.classes": json.dumps(list(class_names)),
    }
    if weights_sha256:
        meta["rtmdet.weights_sha256"] = weights_sha256
    return meta


def export_onnx(model: RTMDet, out: str | os.PathLike, class_names: Sequence[str], input_size: int = 640,
                layout: str = "heads", fp16: bool = False, dynamic_batch: bool = False, batch_size: int = 1,
                weights_sha256: str | None = None, check: bool = True, seed: int = 0,
                dynamic_canvas: bool = False) -> ExportReport:
    """Write `model` as ONNX to `out`; with `check`, compare onnxruntime against PyTorch (float32) on a
    seeded random batch and report the largest difference per output. Raises if it is out of tolerance.
    `dynamic_canvas`: a symbolic height and width (what the tight canvas feeds), checked on a canvas that is not
    the traced square."""
    if input_size % max(model.bbox_head.strides) != 0:
        raise ValueError(f"input size {input_size} is not a multiple of the largest stride "
                         f"{max(model.bbox_head.strides)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    strides = model.bbox_head.strides
    reference = ExportableRTMDet(fused_for_inference(model).float(), strides, layout).eval()
    net = fused_for_inference(model)
    exported = ExportableRTMDet(net.half() if fp16 else net.float(), strides, layout, half=fp16).eval()

    example = example_batch(2 if dynamic_batch else batch_size, input_size, seed)
    tmp = out.with_name(out.name + ".tmp")
    write_onnx(exported, example, tmp, output_names(layout, strides), dynamic_batch, dynamic_canvas)
    _attach_metadata(tmp, model_metadata(model, class_names, input_size, layout, fp16, weights_sha256))
    os.replace(tmp, out)

    report = ExportReport(str(out), layout, fp16, dynamic_batch, input_size, PEAK_TOLERANCE[fp16], dynamic_canvas)
    if check:
        # A batch size other than the one traced proves the batch axis really is dynamic; a canvas a stride
        # shorter, the height.
        check_batch = example_batch(3 if dynamic_batch else batch_size, input_size, seed + 1)
        if dynamic_canvas and input_size > max(strides):
            check_batch = check_batch[:, :input_size - max(strides)].contiguous()
        compare_with_torch(out, reference, check_batch, report)
        if not report.passed:
            raise RuntimeError(f"onnxruntime disagrees with PyTorch: {report.summary()}")
    return report


def write_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, names: Sequence[str],
               dynamic_batch: bool, dynamic_canvas: bool = False) -> None:
    """Export `module` (uint8 images in) to `path` with the dynamo-based exporter (torch.export +
    onnxscript): the TorchScript-based one (dynamo=False) is deprecated with TorchScript. It gives the same
    graph outputs as the TorchScript export: both within 3e-6 of the peak of PyTorch's in fp32 (measured on
    seeded tiny weights, heads and decoded layouts). A dynamic batch costs the exporter more (~10 s for
    tiny here, against ~2 s for a fixed one): it traces with a symbolic batch size. `dynamic_canvas`: the
    input's height and width are symbolic too (any multiple of the largest stride: the `tight` canvas); the
    outputs' shapes follow from them."""
    dynamic_axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]} if dynamic_batch else None
    if dynamic_canvas:
        dynamic_axes = dynamic_axes or {}
        dynamic_axes[INPUT_NAME] = {**dynamic_axes.get(INPUT_NAME, {}), 1: "height", 2: "width"}
    # onnxscript's optimiser logs every rewrite at INFO: keep a server's INFO log for the server.
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(max(q.level, logging.WARNING))
    with warnings.catch_warnings(), contextlib.ExitStack() as restore:
        restore.callback(lambda: [q.setLevel(lv) for q, lv in zip(quiet, levels)])
        warnings.simplefilter("ignore")  # torch.export's notes on the Python loops over levels: shapes only
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=OPSET, verbose=False,
                          input_names=[INPUT_NAME], output_names=list(names), dynamic_axes=dynamic_axes)


def example_batch(batch: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)


def _attach_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def compare_with_torch(path: str | os.PathLike, reference: nn.Module, batch: torch.Tensor,
                       report: ExportReport) -> ExportReport:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: batch.numpy()})
    with torch.inference_mode():
        want = [t.numpy() for t in reference(batch)]
    passed = True
    for out, g, w in zip(session.get_outputs(), got, want, strict=True):
        if g.shape != w.shape:
            raise RuntimeError(f"{path}: output {out.name} has shape {g.shape}, PyTorch gives {w.shape}")
        report.max_abs_diff[out.name] = diff = float(np.abs(g.astype(np.float64) - w).max())
        report.max_ref_abs[out.name] = peak = float(np.abs(w).max())
        report.peak_rel_diff[out.name] = rel = peak_relative(diff, peak)
        passed &= rel <= report.tolerance
    report.passed = passed
    return report


def peak_relative(max_abs_diff: float, peak: float) -> float:
    """`max_abs_diff` as a fraction of the reference's peak; an all-zero reference must be matched exactly
    (to float32's smallest normal)."""
    return max_abs_diff / max(peak, float(np.finfo(np.float32).tiny))


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
