"""DetectionTransform: everything before and after the network, whatever engine runs it.

In: BGR uint8 images -> letterboxed uint8 batch (B, S, S, 3), or (B, H, W, 3) on the `tight` canvas, plus one
`LetterboxInfo` per image (normalisation happens inside the runner, on its device, so only uint8 ever crosses to
an engine).
Out: raw runner outputs -> decode (head maps) -> score filter, top-k -> per-image cut (`DetectParams`:
threshold, classes) -> class-aware NMS keeping each image's best -> original pixels -> one `Detections`
per image.

Like torchvision's `GeneralizedRCNNTransform`, one object owns both halves, so the eager network,
its TorchScript/CUDA-graph forms, ONNX Runtime and Triton all give the same boxes for the same outputs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from model.config import TestConfig
from model.inference.detections import Detections, DetectParams
from model.inference.device_preprocess import preprocess_jpegs
from model.inference.postprocess import (
    BatchDetections,
    Candidates,
    decoded_candidates,
    end_to_end_candidates,
    finish,
    head_candidates,
)
from model.inference.preprocess import LetterboxInfo, letterbox, stack_letterboxed
from model.inference.runner import DecodedOutputs, EndToEndOutputs, HeadOutputs, RunnerOutputs, SparseHeadOutputs
from model.inference.sparse_regression import dense_distances, sparse_distances

# With per-image cuts, candidates are taken once per batch at the lowest threshold asked; each image's own
# threshold and classes then drop its other candidates before NMS, and NMS keeps its own number. Class-aware
# NMS is greedy by score, so boxes under an image's threshold, or of classes it did not ask for, never change
# which of its boxes survive: the result equals running the detector with that image's own settings.


def restrict(cand: Candidates, params: Sequence[DetectParams]) -> tuple[Candidates, torch.Tensor]:
    """The candidates each image asked for (its threshold and classes), and each image's cap."""
    device = cand.scores.device
    thr = torch.tensor([p.score_threshold for p in params], device=device, dtype=cand.scores.dtype)
    keep = cand.scores > thr[cand.image_index]
    if any(p.class_ids is not None for p in params):
        wanted = torch.ones(len(params), cand.num_classes, dtype=torch.bool)
        for i, p in enumerate(params):
            if p.class_ids is not None:
                wanted[i] = False
                ids = [c for c in p.class_ids if 0 <= c < cand.num_classes]
                wanted[i, ids] = True
        keep &= wanted.to(device)[cand.image_index, cand.labels]
    caps = torch.tensor([p.max_detections for p in params], dtype=torch.long)
    return Candidates(cand.image_index[keep], cand.boxes[keep], cand.scores[keep], cand.labels[keep],
                      cand.num_classes), caps


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

    @property
    def canvas_multiple(self) -> int | None:
        """What a `tight` canvas's sides are multiples of (the largest stride); None for the square canvas."""
        return max(self.strides) if self.cfg.canvas == "tight" else None

    # -- in -----------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        """Letterbox each image (on the CPU) into one uint8 batch (B, S, S, 3), or on the `tight` canvas
        (B, H, W, 3), the smallest that holds every image."""
        canvases, infos = zip(*(letterbox(img, self.input_size, self.canvas_multiple) for img in images))
        return stack_letterboxed(canvases, pin_memory=self.device.type == "cuda"), list(infos)

    def preprocess_jpegs(self, data: Sequence[bytes]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        """JPEG bytes -> the letterboxed uint8 batch already on the device (nvJPEG decode and resize on CUDA:
        the CPU only parses headers). Pixels within a level or two of `preprocess`'s; same infos."""
        return preprocess_jpegs(data, self.input_size, self.device, self.canvas_multiple)

    # -- out ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def postprocess(self, outputs: RunnerOutputs, infos: Sequence[LetterboxInfo], cfg: TestConfig | None = None,
                    params: Sequence[DetectParams] | None = None) -> list[Detections]:
        """Detections per image. With `params` (one per image) each image gets its own cut; else `cfg`'s."""
        cfg = cfg or self.cfg
        if params is not None:
            cfg = replace(cfg, score_thr=min(p.score_threshold for p in params))
        dets = self._decode(outputs, infos, cfg, params)
        return [self._detections(*parts) for parts in dets.split(len(infos))]

    def _decode(self, outputs: RunnerOutputs, infos: Sequence[LetterboxInfo], cfg: TestConfig,
                params: Sequence[DetectParams] | None) -> BatchDetections:
        first = outputs[0][0] if isinstance(outputs, HeadOutputs | SparseHeadOutputs) else outputs[0]
        device = first.device
        scale = torch.tensor([[i.scale_w, i.scale_h] for i in infos], device=device)
        orig = torch.tensor([[i.orig_w, i.orig_h] for i in infos], device=device)
        nms = True
        if isinstance(outputs, HeadOutputs):
            cand = head_candidates(outputs.cls_scores, dense_distances(outputs.bbox_preds), self.strides, cfg)
        elif isinstance(outputs, SparseHeadOutputs):
            distances_at = sparse_distances(outputs.regressor, outputs.box_features)
            cand = head_candidates(outputs.cls_scores, distances_at, self.strides, cfg)
        elif isinstance(outputs, DecodedOutputs):
            cand = decoded_candidates(outputs.boxes, outputs.scores, cfg)
        elif isinstance(outputs, EndToEndOutputs):
            cand, nms = end_to_end_candidates(outputs.dets, outputs.labels, cfg, len(self.class_names)), False
        else:
            raise TypeError(f"unknown runner outputs {type(outputs).__name__}")
        caps = None
        if params is not None:
            cand, caps = restrict(cand, params)
        return finish(cand, scale, orig, cfg, nms=nms, caps=caps)

    def _detections(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> Detections:
        labels_np = labels.cpu().numpy().astype(np.int64)
        return Detections(boxes.cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32),
                          labels_np, [self.class_names[i] for i in labels_np])
