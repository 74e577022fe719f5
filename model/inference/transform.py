"""DetectionTransform: everything before and after the network, whatever engine runs it.

In: BGR uint8 images -> letterboxed uint8 batch (B, S, S, 3) plus one `LetterboxInfo` per image
(normalisation happens inside the runner, on its device, so only uint8 ever crosses to an engine).
Out: raw runner outputs -> decode (head maps) -> score filter, top-k, batched class-aware NMS ->
original pixels -> per-image cut (`DetectParams`) -> one `Detections` per image.

Like torchvision's `GeneralizedRCNNTransform`, one object owns both halves, so the eager network,
its TorchScript/CUDA-graph forms, ONNX Runtime and Triton all give the same boxes for the same outputs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from model.config import TestConfig
from model.inference.detections import Detections, DetectParams, filter_detections
from model.inference.device_preprocess import preprocess_jpegs
from model.inference.postprocess import (
    BatchDetections,
    decoded_candidates,
    end_to_end_candidates,
    finish,
    head_candidates,
)
from model.inference.preprocess import LetterboxInfo, letterbox, stack_letterboxed
from model.inference.runner import DecodedOutputs, EndToEndOutputs, HeadOutputs, RunnerOutputs

# With per-image cuts, NMS runs once per batch at the lowest threshold asked and without a per-image cap;
# each image is cut afterwards. Class-aware NMS is greedy by score, so boxes under an image's threshold, or
# of classes it did not ask for, never change which of its boxes survive: the result equals running the
# detector with that image's own settings.
NO_CAP = 1_000_000


class DetectionTransform:
    def __init__(self, class_names: Sequence[str], strides: Sequence[int], cfg: TestConfig,
                 device: torch.device | str = "cpu") -> None:
        self.class_names = list(class_names)
        self.strides = tuple(strides)
        self.cfg = cfg
        self.device = torch.device(device)

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    # -- in -----------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        """Letterbox each image (on the CPU) into one uint8 batch (B, S, S, 3)."""
        canvases, infos = zip(*(letterbox(img, self.input_size) for img in images))
        return stack_letterboxed(canvases, pin_memory=self.device.type == "cuda"), list(infos)

    def preprocess_jpegs(self, data: Sequence[bytes]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        """JPEG bytes -> the letterboxed uint8 batch already on the device (nvJPEG decode and resize on CUDA:
        the CPU only parses headers). Pixels within a level or two of `preprocess`'s; same infos."""
        return preprocess_jpegs(data, self.input_size, self.device)

    # -- out ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def postprocess(self, outputs: RunnerOutputs, infos: Sequence[LetterboxInfo], cfg: TestConfig | None = None,
                    params: Sequence[DetectParams] | None = None) -> list[Detections]:
        """Detections per image. With `params` (one per image) each image gets its own cut; else `cfg`'s."""
        cfg = cfg or self.cfg
        if params is not None:
            cfg = replace(cfg, score_thr=min(p.score_threshold for p in params), max_per_img=NO_CAP)
        dets = self._decode(outputs, infos, cfg)
        out = [self._detections(*parts) for parts in dets.split(len(infos))]
        if params is None:
            return out
        return [filter_detections(d, p) for d, p in zip(out, params)]

    def _decode(self, outputs: RunnerOutputs, infos: Sequence[LetterboxInfo], cfg: TestConfig) -> BatchDetections:
        first = outputs[0][0] if isinstance(outputs, HeadOutputs) else outputs[0]
        device = first.device
        scale = torch.tensor([[i.scale_w, i.scale_h] for i in infos], device=device)
        orig = torch.tensor([[i.orig_w, i.orig_h] for i in infos], device=device)
        if isinstance(outputs, HeadOutputs):
            return finish(head_candidates(outputs.cls_scores, outputs.bbox_preds, self.strides, cfg), scale, orig, cfg)
        if isinstance(outputs, DecodedOutputs):
            return finish(decoded_candidates(outputs.boxes, outputs.scores, cfg), scale, orig, cfg)
        if isinstance(outputs, EndToEndOutputs):
            cand = end_to_end_candidates(outputs.dets, outputs.labels, cfg, len(self.class_names))
            return finish(cand, scale, orig, cfg, nms=False)
        raise TypeError(f"unknown runner outputs {type(outputs).__name__}")

    def _detections(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> Detections:
        labels_np = labels.cpu().numpy().astype(np.int64)
        return Detections(boxes.cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32),
                          labels_np, [self.class_names[i] for i in labels_np])
