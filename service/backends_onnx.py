"""RTMDET_BACKEND=onnx: the network in-process on ONNX Runtime, from an exported `.onnx` file.

`RTMDET_WEIGHTS` names the file. Three kinds of file are understood, told apart by their outputs:
- `rtmdet export` heads (`cls_s8`, ..., `reg_s32`): the model's own post-processing runs after it.
- `rtmdet export --decode` (`boxes` (B,N,4) on the canvas, `scores` (B,N,C)): score filter, top-k and
  class-aware NMS here, as `model.inference.postprocess` does them per level.
- an MMDeploy end-to-end export (`dets` (B,N,5) x1,y1,x2,y2,score on the canvas, `labels` (B,N); NMS
  already inside; float input (B,3,S,S) normalised outside the graph): only threshold, rescale, clip.
Input is either our uint8 (B,S,S,3) letterboxed batch or, for MMDeploy files, that batch normalised
here with the official mean/std. A file with a fixed batch size runs batches in chunks of that size.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms

from model.config import PIXEL_MEAN_BGR, PIXEL_STD_BGR, STRIDES, TestConfig
from model.inference.detector import Detections, file_sha256
from model.inference.preprocess import LetterboxInfo
from service.backends_external import ExternalNetworkBackend, NetworkInfo

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


class OnnxBackend(ExternalNetworkBackend):
    name = "onnx"

    def __init__(self, path: str | os.PathLike, test_config: TestConfig | None = None,
                 class_names: Sequence[str] | None = None, providers: Sequence[str] | None = None,
                 threads: int = 0) -> None:
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
        cfg = test_config or TestConfig.serving()
        info = NetworkInfo.from_metadata(meta, fixed_size or cfg.input_size, class_names)
        if fixed_size and fixed_size != cfg.input_size:
            cfg = replace(cfg, input_size=fixed_size)
        info = NetworkInfo(info.size, cfg.input_size, info.class_names, info.strides, info.dtype,
                           info.weights_sha256 or file_sha256(path))
        super().__init__(info, cfg, device_label=f"onnxruntime:{chosen[0]}")
        self._mean = np.array(PIXEL_MEAN_BGR, np.float32).reshape(1, 3, 1, 1)
        self._inv_std = (1.0 / np.array(PIXEL_STD_BGR, np.float32)).reshape(1, 3, 1, 1)

    @classmethod
    def from_settings(cls, settings) -> OnnxBackend:
        from service.backends import BackendUnavailable

        cfg = TestConfig.serving(score_thr=settings.score_threshold, input_size=settings.input_size or 640,
                                 max_per_img=settings.max_detections_limit)
        try:
            return cls(settings.weights, cfg, settings.class_names)
        except Exception as exc:  # onnxruntime raises its own types for unreadable files
            raise BackendUnavailable(f"{settings.weights}: cannot serve with ONNX Runtime: {exc}") from None

    # -- the network ----------------------------------------------------------------------------------
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

    def forward(self, batch: torch.Tensor):
        outs = dict(zip(self.output_names, self._run(batch.numpy())))
        if self.layout == LAYOUT_HEADS:
            strides = self.info.strides
            return ([torch.from_numpy(outs[f"cls_s{s}"]) for s in strides],
                    [torch.from_numpy(outs[f"reg_s{s}"]) for s in strides])
        if self.layout == LAYOUT_DECODED:
            return torch.from_numpy(outs["boxes"]), torch.from_numpy(outs["scores"])
        return torch.from_numpy(outs["dets"]), torch.from_numpy(outs["labels"])

    # -- after the network ----------------------------------------------------------------------------
    @torch.inference_mode()
    def postprocess(self, first, second, infos: Sequence[LetterboxInfo],
                    cfg: TestConfig | None = None) -> list[Detections]:
        cfg = cfg or self.test_config
        if self.layout == LAYOUT_HEADS:
            return super().postprocess(first, second, infos, cfg)
        if self.layout == LAYOUT_DECODED:
            return [self._finish(*self._nms(boxes, scores, cfg), info, cfg)
                    for boxes, scores, info in zip(first, second, infos)]
        return [self._finish(dets[:, :4], dets[:, 4], labels.long(), info, cfg)
                for dets, labels, info in zip(first, second, infos)]

    @staticmethod
    def _nms(boxes: torch.Tensor, scores: torch.Tensor, cfg: TestConfig):
        """(N,4) canvas boxes and (N,C) probabilities of one image -> kept (boxes, scores, labels)."""
        flat = scores.float().reshape(-1)
        keep = (flat > cfg.score_thr).nonzero(as_tuple=True)[0]
        if keep.numel() > cfg.nms_pre:
            keep = keep[flat[keep].topk(cfg.nms_pre).indices]
        num_classes = scores.shape[1]
        prior, label, score = keep // num_classes, keep % num_classes, flat[keep]
        box = boxes.float()[prior]
        valid = ((box[:, 2] - box[:, 0]) > 0) & ((box[:, 3] - box[:, 1]) > 0)
        box, score, label = box[valid], score[valid], label[valid]
        kept = batched_nms(box, score, label, cfg.iou_thr)
        return box[kept], score[kept], label[kept]

    def _finish(self, box: torch.Tensor, score: torch.Tensor, label: torch.Tensor, info: LetterboxInfo,
                cfg: TestConfig) -> Detections:
        """Threshold, best `max_per_img`, canvas -> original pixels, clip."""
        score = score.float()
        keep = (score > cfg.score_thr).nonzero(as_tuple=True)[0]
        keep = keep[score[keep].argsort(descending=True, stable=True)][:cfg.max_per_img]
        box = box.float()[keep] / torch.tensor([info.scale_w, info.scale_h] * 2)
        box = torch.minimum(box.clamp(min=0), torch.tensor([info.orig_w, info.orig_h] * 2, dtype=box.dtype))
        return self.detections(box, score[keep], label[keep])
