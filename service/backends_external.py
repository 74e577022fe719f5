"""The common half of backends whose network runs outside PyTorch (ONNX Runtime, Triton).

They keep the model's own CPU steps, `model.inference.preprocess.letterbox` before the network and
`model.inference.postprocess.postprocess` (score filter, top-k, batched NMS, rescale) after it, and
replace only `forward`. So detections match the in-process backend's up to the runtimes' float noise.

What the network is (classes, size, strides, input size) comes from the exported file's `rtmdet.*`
metadata (`model.export`), read by the subclass.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.classes import COCO_CLASSES
from model.config import PAD_VALUE, STRIDES, TestConfig
from model.inference.detector import Detections
from model.inference.postprocess import postprocess
from model.inference.preprocess import LetterboxInfo, letterbox, stack_letterboxed


@dataclass(frozen=True)
class NetworkInfo:
    """What a backend knows about the exported network."""

    size: str
    input_size: int
    class_names: tuple[str, ...]
    strides: tuple[int, ...] = STRIDES
    dtype: str = "float32"
    weights_sha256: str | None = None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], default_input_size: int,
                      class_names: Sequence[str] | None = None) -> NetworkInfo:
        names = class_names or json.loads(meta.get("rtmdet.classes", "null")) or COCO_CLASSES
        return cls(size=meta.get("rtmdet.size", "unknown"),
                   input_size=int(meta.get("rtmdet.input_size", default_input_size)),
                   class_names=tuple(names),
                   strides=tuple(json.loads(meta.get("rtmdet.strides", json.dumps(STRIDES)))),
                   dtype=meta.get("rtmdet.dtype", "float32"),
                   weights_sha256=meta.get("rtmdet.weights_sha256"))


class ExternalNetworkBackend:
    """preprocess / postprocess / describe / warm-up around a `forward` that subclasses provide."""

    name = "external"

    def __init__(self, info: NetworkInfo, test_config: TestConfig, device_label: str) -> None:
        self.info = info
        self.test_config = test_config
        self.class_names = list(info.class_names)
        self.device_label = device_label
        self._warm = False

    # -- the Backend interface ------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        canvases, infos = zip(*(letterbox(img, self.info.input_size) for img in images))
        return stack_letterboxed(canvases), list(infos)

    def forward(self, batch: torch.Tensor):
        raise NotImplementedError

    @torch.inference_mode()
    def postprocess(self, cls_scores, bbox_preds, infos: Sequence[LetterboxInfo],
                    cfg: TestConfig | None = None) -> list[Detections]:
        cfg = cfg or self.test_config
        scale = torch.tensor([[i.scale_w, i.scale_h] for i in infos])
        orig = torch.tensor([[i.orig_w, i.orig_h] for i in infos])
        dets = postprocess(cls_scores, bbox_preds, self.info.strides, scale, orig, cfg)
        return [self.detections(b, s, lbl) for b, s, lbl in dets.split(len(infos))]

    def detections(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> Detections:
        labels_np = labels.cpu().numpy().astype(np.int64)
        return Detections(boxes.cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32),
                          labels_np, [self.class_names[i] for i in labels_np])

    def describe(self) -> dict:
        return {"name": f"rtmdet-{self.info.size}", "size": self.info.size, "classes": list(self.class_names),
                "input_size": self.info.input_size, "device": self.device_label, "dtype": self.info.dtype,
                "weights_sha256": self.info.weights_sha256, "backend": self.name}

    def is_ready(self) -> bool:
        return self._warm

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        s = self.info.input_size
        for b in batch_sizes:
            batch, infos = self.preprocess([np.full((s, s, 3), PAD_VALUE, dtype=np.uint8)] * b)
            self.postprocess(*self.forward(batch), infos)
        self._warm = True

    def mark_ready(self) -> None:
        """For a service started without warm-up."""
        self._warm = True
