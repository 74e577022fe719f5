"""RTMDET_BACKEND=onnx: the network in-process on ONNX Runtime, from an exported `.onnx` file.

Three kinds of file are understood, told apart by their outputs, each giving one runner output kind:
- `rtmdet export` heads (`cls_s8`, ..., `reg_s32`) -> `HeadOutputs`;
- `rtmdet export --decode` (`boxes` (B,N,4) on the canvas, `scores` (B,N,C)) -> `DecodedOutputs`;
- an MMDeploy end-to-end export (`dets` (B,N,5), `labels` (B,N); NMS inside; float input (B,3,S,S)
  normalised outside the graph) -> `EndToEndOutputs`.
The model's transform does the rest, so detections match the in-process backend's up to float noise.
What the network is (classes, size, strides, input size) comes from the file's `rtmdet.*` metadata
(`model.export`). A file with a fixed batch size runs batches in chunks of that size.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.config import PIXEL_MEAN_BGR, PIXEL_STD_BGR, STRIDES
from model.inference.detector import file_sha256
from model.inference.runner import (
    DecodedOutputs,
    EndToEndOutputs,
    RunnerOutputs,
    blank_batch,
)
from service.backends.exported import head_outputs, network_info
from service.errors import BackendUnavailable
from service.settings import ModelSpec

LAYOUT_HEADS, LAYOUT_DECODED, LAYOUT_MMDEPLOY = "heads", "decoded", "mmdeploy"


def detect_layout(output_names: Sequence[str]) -> str:
    names = set(output_names)
    if {"dets", "labels"} <= names:
        return LAYOUT_MMDEPLOY
    if {"boxes", "scores"} <= names:
        return LAYOUT_DECODED
    if all(f"cls_s{s}" in names and f"reg_s{s}" in names for s in STRIDES):
        return LAYOUT_HEADS
    raise ValueError(f"unrecognised ONNX outputs {sorted(names)}: expected an `rtmdet export` file "
                     "(cls_s8.. reg_s32, or boxes+scores) or an MMDeploy end-to-end file (dets+labels)")


class OnnxRunner:
    device = torch.device("cpu")  # outputs come back as host arrays whatever the provider

    def __init__(self, path: str | os.PathLike, class_names: Sequence[str] | None = None,
                 providers: Sequence[str] | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ("CUDAExecutionProvider", "CPUExecutionProvider")) if p in available]
        self.session = ort.InferenceSession(str(path), options, providers=chosen)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.layout = detect_layout(self.output_names)
        self.float_input = inp.type != "tensor(uint8)"
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        # NHWC uint8 (ours) has the size at axis 1, NCHW float (MMDeploy) at axis 2.
        size_axis = 2 if self.float_input else 1
        fixed_size = inp.shape[size_axis] if isinstance(inp.shape[size_axis], int) else None
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = network_info(meta, "onnx", f"onnxruntime:{chosen[0]}", fixed_size, fixed_size is not None,
                                 class_names, file_sha256(path))
        self._mean = np.array(PIXEL_MEAN_BGR, np.float32).reshape(1, 3, 1, 1)
        self._inv_std = (1.0 / np.array(PIXEL_STD_BGR, np.float32)).reshape(1, 3, 1, 1)

    def _inputs(self, batch_uint8: np.ndarray) -> np.ndarray:
        if not self.float_input:
            return batch_uint8
        x = batch_uint8.transpose(0, 3, 1, 2).astype(np.float32)
        return np.ascontiguousarray(((x - self._mean) * self._inv_std).astype(self.input_dtype))

    def _run(self, batch_uint8: np.ndarray) -> list[np.ndarray]:
        step = self.fixed_batch or batch_uint8.shape[0]
        chunks = []
        for start in range(0, batch_uint8.shape[0], step):
            part = batch_uint8[start:start + step]
            short = step - part.shape[0]
            if short:  # a fixed-batch file: pad the last chunk, drop the padding's outputs
                part = np.concatenate([part, np.repeat(part[-1:], short, axis=0)])
            outs = self.session.run(None, {self.input_name: self._inputs(part)})
            chunks.append([o[:step - short] for o in outs])
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def forward(self, batch_uint8: torch.Tensor) -> RunnerOutputs:
        outs = dict(zip(self.output_names, self._run(batch_uint8.cpu().numpy())))
        if self.layout == LAYOUT_HEADS:
            return head_outputs(outs, self.info.strides)
        if self.layout == LAYOUT_DECODED:
            return DecodedOutputs(torch.from_numpy(outs["boxes"]), torch.from_numpy(outs["scores"]))
        return EndToEndOutputs(torch.from_numpy(outs["dets"]), torch.from_numpy(outs["labels"]))

    def warmup(self, batch_sizes: Sequence[int], input_size: int) -> None:
        for b in batch_sizes:
            self.forward(blank_batch(b, input_size))

    def is_ready(self) -> bool:
        return True

    def close(self) -> None:
        self.session = None


def build(spec: ModelSpec) -> OnnxRunner:
    try:
        return OnnxRunner(spec.weights, spec.class_names)
    except Exception as exc:  # onnxruntime raises its own types for unreadable files
        raise BackendUnavailable(f"{spec.weights}: cannot serve with ONNX Runtime: {exc}") from None
