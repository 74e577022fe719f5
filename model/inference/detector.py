"""Detector: images in, detections out. The one interface everything that detects goes through."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import class_names_from_meta, infer_num_classes, load_state_dict_strict, read_checkpoint
from model.classes import COCO_CLASSES
from model.config import PAD_VALUE, TestConfig
from model.errors import ImageError
from model.inference.accelerate import build_runner, resolve_mode
from model.inference.device_preprocess import preprocess_jpegs
from model.inference.postprocess import postprocess
from model.inference.preprocess import LetterboxInfo, Normalizer, letterbox, stack_letterboxed
from model.inference.runner_choice import CANDIDATES as AUTO_CANDIDATES
from model.inference.runner_choice import AutoChoice, choose_runner
from model.nn.rtmdet import RTMDet, build_rtmdet, fused_for_inference


@dataclass
class Detections:
    """Detections of one image: boxes are xyxy in the original image's pixels."""

    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64
    class_names: list[str] = field(default_factory=list)  # one per detection

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_list(self) -> list[dict]:
        return [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(lbl),
                 "class_name": n}
                for b, s, lbl, n in zip(self.boxes, self.scores, self.labels, self.class_names)]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Detector:
    """Letterbox -> network -> batched post-processing, on CUDA when there is one, else the CPU.

    `detector(images)` takes BGR uint8 H x W x 3 arrays (as cv2.imread gives them) and returns one
    `Detections` per image. The batch is whatever list it is given: callers (the service's batcher)
    decide batch sizes.

    `accelerate` picks the runner (model.inference.accelerate): None is the device's default (`eager` on
    the CPU, `cudagraph` on CUDA); `auto` measures the CPU runners on the first batch and keeps the fastest
    that matches eager (its measurements in `auto_choice`; `auto_candidates` limits the field, e.g. without
    `inductor` to save its compile); or one of `inductor`, `onnxruntime`,
    `openvino`, `torchscript` (deprecated TorchScript, opt-in).
    """

    def __init__(self, model: RTMDet, class_names: Sequence[str] | None = None,
                 device: str | torch.device | None = None, fp16: bool = False,
                 test_cfg: TestConfig | None = None, fuse: bool = True, channels_last: bool | None = None,
                 weights_sha256: str | None = None, accelerate: str | None = None,
                 auto_candidates: Sequence[str] = AUTO_CANDIDATES) -> None:
        self.device = resolve_device(device)
        self.size = model.size
        self.num_classes = model.num_classes
        names = list(class_names) if class_names is not None else list(COCO_CLASSES)
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for a model with {self.num_classes} classes")
        self.class_names = names
        self.cfg = test_cfg or TestConfig.serving()
        self.fp16 = bool(fp16 and self.device.type == "cuda")
        self.dtype = torch.float16 if self.fp16 else torch.float32
        # channels_last helps oneDNN's CPU convolutions too (RTMDet-tiny, 1 thread: 202 ms vs 230 ms NCHW).
        self.channels_last = True if channels_last is None else channels_last
        self.accelerate = resolve_mode(accelerate, self.device)
        if self.accelerate == "cudagraph":
            torch.backends.cudnn.benchmark = True  # shapes are fixed per captured bucket: let cuDNN time kernels
        self.strides = model.bbox_head.strides
        self.weights_sha256 = weights_sha256
        net = fused_for_inference(model) if fuse else model.eval()
        net = net.to(self.device, dtype=self.dtype)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.network = net.eval()
        self.normalize = Normalizer(self.device, self.dtype, self.channels_last)
        self.auto_candidates = tuple(auto_candidates)
        self.auto_choice: AutoChoice | None = None
        self._runner = None  # built on the first forward, when the input shape is known

    def _build_runner(self, example_uint8: torch.Tensor | None):
        if self.accelerate == "auto":
            runner, self.auto_choice = choose_runner(self.network, self.normalize, example_uint8, self.strides,
                                                     candidates=self.auto_candidates)
            self.accelerate = self.auto_choice.chosen
            return runner
        return build_runner(self.accelerate, self.network, self.normalize, example_uint8, self.strides)

    def set_runner(self, runner, name: str) -> None:
        """Run the network with `runner` (uint8 batch -> raw head outputs, model.inference.accelerate), e.g.
        one built elsewhere and shared; `name` is what `describe()` reports."""
        self._runner, self.accelerate = runner, name

    def _run(self, batch_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.accelerate == "cudagraph":
            batch_uint8 = batch_uint8.to(self.device, non_blocking=True)
        if self._runner is None:
            self._runner = self._build_runner(batch_uint8)
        return self._runner(batch_uint8)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, size: str = "tiny", device: str | torch.device | None = None,
                        classes: Sequence[str] | None = None, weights_key: str = "ema", **kwargs) -> Detector:
        """Build the network for `size`, load `path` strictly (`weights_key`: see `model.checkpoint`); class
        names from the argument, else the checkpoint's meta, else COCO's (the number of classes follows the
        checkpoint). Without a `test_cfg`, serving thresholds at the checkpoint's training size (meta
        `img_size`, else 640)."""
        state, meta = read_checkpoint(path, weights_key)
        num_classes = infer_num_classes(state) or 80
        model = build_rtmdet(size, num_classes=num_classes)
        load_state_dict_strict(model, state, source=str(path))
        names = list(classes) if classes is not None else class_names_from_meta(meta)
        if names is None and num_classes != 80:
            names = [f"class_{i}" for i in range(num_classes)]
        if kwargs.get("test_cfg") is None:
            # A model trained at a small size (meta `img_size`) is served at that size unless told otherwise.
            kwargs["test_cfg"] = TestConfig.serving(input_size=int(meta.get("img_size", 640)))
        return cls(model, names, device=device, weights_sha256=file_sha256(path), **kwargs)

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    def with_config(self, **changes) -> TestConfig:
        return replace(self.cfg, **changes)

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        """CPU half of the work: letterbox each image into a uint8 batch (B, S, S, 3)."""
        canvases, infos = zip(*(letterbox(img, self.input_size) for img in images))
        return stack_letterboxed(canvases, pin_memory=self.device.type == "cuda"), list(infos)

    def preprocess_jpegs(self, data: Sequence[bytes]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        """JPEG bytes -> the letterboxed uint8 batch already on the device (nvJPEG decode and resize on CUDA:
        the CPU only parses headers). Pixels within a level or two of `preprocess`'s; same infos."""
        return preprocess_jpegs(data, self.input_size, self.device)

    @torch.inference_mode()
    def forward(self, batch_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self._run(batch_uint8)

    @torch.inference_mode()
    def postprocess(self, cls_scores, bbox_preds, infos: Sequence[LetterboxInfo],
                    cfg: TestConfig | None = None) -> list[Detections]:
        cfg = cfg or self.cfg
        scale = torch.tensor([[i.scale_w, i.scale_h] for i in infos], device=self.device)
        orig = torch.tensor([[i.orig_w, i.orig_h] for i in infos], device=self.device)
        dets = postprocess(cls_scores, bbox_preds, self.strides, scale, orig, cfg)
        out = []
        for boxes, scores, labels in dets.split(len(infos)):
            labels_np = labels.cpu().numpy()
            out.append(Detections(boxes.cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32),
                                  labels_np, [self.class_names[i] for i in labels_np]))
        return out

    def __call__(self, images: Sequence[np.ndarray], cfg: TestConfig | None = None) -> list[Detections]:
        if len(images) == 0:
            return []
        batch, infos = self.preprocess(images)
        cls_scores, bbox_preds = self.forward(batch)
        return self.postprocess(cls_scores, bbox_preds, infos, cfg)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run each batch size so lazy allocations, kernel choices, TorchScript's shape profiling (two calls)
        and CUDA graph captures are paid before real traffic. On CUDA the sizes become the graph buckets.
        With `auto`, the first size is the one the runners are measured at."""
        if self.accelerate == "cudagraph":
            if self._runner is None:
                self._runner = self._build_runner(None)
            self._runner.buckets = sorted(set(batch_sizes))
        for b in batch_sizes:
            img = np.full((self.input_size, self.input_size, 3), PAD_VALUE, dtype=np.uint8)
            self([img] * b)
            for _ in range(getattr(self._runner, "warmup_calls", 1) - 1):
                self([img] * b)

    def describe(self) -> dict:
        return {"name": f"rtmdet-{self.size}", "size": self.size, "classes": list(self.class_names),
                "input_size": self.input_size, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "accelerate": self.accelerate,
                "weights_sha256": self.weights_sha256}


def load_image(path: str | Path) -> np.ndarray:
    """BGR uint8 image from a file. The bytes are read here and decoded from memory, so a missing file is our
    one-line error rather than OpenCV's `[ WARN ]` line on stderr."""
    import cv2
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the image file ({exc.strerror or exc})") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise ImageError(f"{path}: not a readable image")
    return img
