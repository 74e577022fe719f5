"""Detector = DetectionTransform + Runner: images in, detections out. The one interface everything that
detects goes through; the runner decides only how the network runs (see `model.inference.runner`)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import class_names_from_meta, infer_num_classes, load_state_dict_strict, read_checkpoint
from model.classes import COCO_CLASSES
from model.config import PAD_VALUE, TestConfig
from model.errors import ImageError
from model.inference.detections import Detections, DetectParams
from model.inference.preprocess import LetterboxInfo, canvas_shape, orientation_groups, resized_shape
from model.inference.runner import HeadOutputs, NetworkInfo, Runner, RunnerOutputs, SparseHeadOutputs, blank_batch
from model.inference.runner_choice import CANDIDATES as AUTO_CANDIDATES
from model.inference.runner_choice import AutoChoice
from model.inference.torch_runner import TorchRunner
from model.inference.transform import DetectionTransform
from model.nn.rtmdet import RTMDet, build_rtmdet

__all__ = ["Detections", "DetectParams", "Detector", "file_sha256", "load_image", "resolve_device"]


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


def load_torch_network(path: str | os.PathLike, size: str = "tiny", classes: Sequence[str] | None = None,
                       weights_key: str = "ema") -> tuple[RTMDet, list[str] | None, dict]:
    """Build the network for `size` and load `path` strictly (the number of classes follows the checkpoint;
    `weights_key`: which weights of a training checkpoint, see `model.checkpoint`). Class names: the argument,
    else the checkpoint's meta, else None (COCO's for 80 classes)."""
    state, meta = read_checkpoint(path, weights_key)
    num_classes = infer_num_classes(state) or 80
    model = build_rtmdet(size, num_classes=num_classes)
    load_state_dict_strict(model, state, source=str(path))
    names = list(classes) if classes is not None else class_names_from_meta(meta)
    if names is None and num_classes != 80:
        names = [f"class_{i}" for i in range(num_classes)]
    return model, names, meta


class Detector:
    """Letterbox -> runner -> batched post-processing, on CUDA when there is one, else the CPU.

    `detector(images)` takes BGR uint8 H x W x 3 arrays (as cv2.imread gives them) and returns one
    `Detections` per image. The batch is whatever list it is given: callers (the service's batcher)
    decide batch sizes. `Detector(model, ...)` runs an RTMDet module in-process; `Detector.from_runner`
    puts any other engine behind the same transform.

    `accelerate` picks how the in-process network runs (model.inference.accelerate): None is the device's
    default (`eager` on the CPU, `cudagraph` on CUDA); `auto` measures the CPU runners on the first batch and
    keeps the fastest that matches eager (its measurements in `auto_choice`; `auto_candidates` limits the field,
    e.g. without `inductor` to save its compile; `auto_choices_file` keeps the choice for the next process on this
    machine, model.inference.choice_store); or one of `inductor`, `onnxruntime`, `openvino`,
    `torchscript` (deprecated TorchScript, opt-in); or, reduced precision by name only, `openvino-bf16` or
    `openvino-int8` (model.inference.low_precision), the latter calibrated on `calibration` (a folder of
    real images, or BGR arrays).

    `sparse_regression` (CPU, float32 runners): the runner leaves out the box branch and post-processing runs it
    at the candidates alone (model.inference.sparse_regression); the same boxes, less work at serving
    thresholds, where few points pass the score threshold.
    """

    def __init__(self, model: RTMDet, class_names: Sequence[str] | None = None,
                 device: str | torch.device | None = None, fp16: bool = False,
                 test_cfg: TestConfig | None = None, fuse: bool = True, channels_last: bool | None = None,
                 weights_sha256: str | None = None, accelerate: str | None = None,
                 auto_candidates: Sequence[str] = AUTO_CANDIDATES, calibration=None,
                 auto_choices_file: str | Path | None = None, sparse_regression: bool = False) -> None:
        names = list(class_names) if class_names is not None else list(COCO_CLASSES)
        if len(names) != model.num_classes:
            raise ValueError(f"{len(names)} class names for a model with {model.num_classes} classes")
        cfg = test_cfg or TestConfig.serving()
        runner = TorchRunner(model, names, resolve_device(device), fp16=fp16, fuse=fuse, channels_last=channels_last,
                             accelerate=accelerate, weights_sha256=weights_sha256, auto_candidates=auto_candidates,
                             calibration=calibration, auto_choices_file=auto_choices_file,
                             sparse_regression=sparse_regression, any_canvas=cfg.canvas == "tight")
        self._attach(runner, cfg)

    @classmethod
    def from_runner(cls, runner: Runner, test_cfg: TestConfig | None = None) -> Detector:
        """Any runner behind the transform. An export with a static input shape fixes the input size."""
        det = cls.__new__(cls)
        cfg = test_cfg or TestConfig.serving(input_size=runner.info.input_size or 640)
        if runner.info.fixed_input_size and runner.info.input_size != cfg.input_size:
            cfg = replace(cfg, input_size=runner.info.input_size)
        det._attach(runner, cfg)
        return det

    def _attach(self, runner: Runner, cfg: TestConfig) -> None:
        check_canvas(runner.info, cfg)
        self.runner = runner
        self.transform = DetectionTransform(runner.info.class_names, runner.info.strides, cfg, runner.device)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, size: str = "tiny", device: str | torch.device | None = None,
                        classes: Sequence[str] | None = None, weights_key: str = "ema", canvas: str = "square",
                        **kwargs) -> Detector:
        """Build the network for `size`, load `path` strictly (`weights_key`: see `model.checkpoint`); class
        names from the argument, else the checkpoint's meta, else COCO's (the number of classes follows the
        checkpoint). Without a `test_cfg`, serving thresholds at the checkpoint's training size (meta
        `img_size`, else 640) on `canvas`."""
        model, names, meta = load_torch_network(path, size, classes, weights_key)
        if kwargs.get("test_cfg") is None:
            # A model trained at a small size (meta `img_size`) is served at that size unless told otherwise.
            kwargs["test_cfg"] = TestConfig.serving(input_size=int(meta.get("img_size", 640)), canvas=canvas)
        return cls(model, names, device=device, weights_sha256=file_sha256(path), **kwargs)

    # -- what it is ---------------------------------------------------------------------------------
    @property
    def info(self) -> NetworkInfo:
        return self.runner.info

    @property
    def cfg(self) -> TestConfig:
        return self.transform.cfg

    @cfg.setter
    def cfg(self, cfg: TestConfig) -> None:
        check_canvas(self.info, cfg)
        self.transform.cfg = cfg

    @property
    def class_names(self) -> list[str]:
        return self.transform.class_names

    @property
    def num_classes(self) -> int:
        return len(self.transform.class_names)

    @property
    def size(self) -> str:
        return self.info.size

    @property
    def device(self) -> torch.device:
        return self.transform.device

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    @property
    def weights_sha256(self) -> str | None:
        return self.info.weights_sha256

    @property
    def accelerate(self) -> str | None:
        return self.info.accelerate

    @property
    def auto_choice(self) -> AutoChoice | None:
        """With `accelerate="auto"`: what was measured and chosen (None before the first batch, or otherwise)."""
        return getattr(self.runner, "auto_choice", None)

    @property
    def network(self):
        return self.runner.network

    @property
    def engine_network(self):
        """The module the runner's engine runs: `network`, or without its box branch with `sparse_regression`."""
        return self.runner.engine_network

    @property
    def normalize(self):
        return self.runner.normalize

    @property
    def strides(self) -> tuple[int, ...]:
        return self.info.strides

    def set_runner(self, engine, name: str) -> None:
        """Run the in-process network with `engine` (uint8 batch -> raw head outputs, model.inference.accelerate),
        e.g. one built elsewhere and shared; `name` is what `describe()` reports."""
        self.runner.set_engine(engine, name)

    def with_config(self, **changes) -> TestConfig:
        return replace(self.cfg, **changes)

    def describe(self) -> dict:
        i = self.info
        return {"name": i.name, "size": i.size, "classes": list(self.class_names), "input_size": self.input_size,
                "canvas": self.cfg.canvas,
                "device": i.device, "dtype": i.dtype, "accelerate": i.accelerate, "backend": i.backend,
                "weights_sha256": i.weights_sha256}

    # -- the path of an image -----------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        return self.transform.preprocess(images)

    def preprocess_jpegs(self, data: Sequence[bytes]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        return self.transform.preprocess_jpegs(data)

    def forward(self, batch_uint8: torch.Tensor) -> RunnerOutputs:
        return self.runner.forward(batch_uint8)

    @property
    def overlapping_calls(self) -> bool:
        """Whether two threads may call `forward` (and `postprocess`) at once, and gain from it; False unless the
        runner says so."""
        return bool(getattr(self.runner, "overlapping_calls", False))

    def postprocess(self, outputs: RunnerOutputs, infos: Sequence[LetterboxInfo], cfg: TestConfig | None = None,
                    params: Sequence[DetectParams] | None = None) -> list[Detections]:
        return self.transform.postprocess(outputs, infos, cfg, params)

    def __call__(self, images: Sequence[np.ndarray], cfg: TestConfig | None = None) -> list[Detections]:
        """One `Detections` per image, in order. On the `tight` canvas, landscape and portrait images run as two
        batches (`orientation_groups`); on the square canvas, as one."""
        if len(images) == 0:
            return []
        everything = [list(range(len(images)))]
        groups = orientation_groups([img.shape[:2] for img in images]) if self.cfg.canvas == "tight" else everything
        results: list[Detections | None] = [None] * len(images)
        for group in groups:
            batch, infos = self.preprocess([images[i] for i in group])
            for i, dets in zip(group, self.postprocess(self.forward(batch), infos, cfg), strict=True):
                results[i] = dets
        return results

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Warm the runner at each batch size, then the whole path once. On the `tight` canvas, each batch size
        also at a landscape and a portrait 4:3 canvas: inductor then compiles its graph for any height and width
        now rather than on live traffic, and OpenVINO has the commonest photo shapes compiled."""
        self.runner.warmup(batch_sizes, self.input_size)
        if self.cfg.canvas == "tight":
            for h, w in tight_warmup_canvases(self.input_size, max(self.strides)):
                for b in batch_sizes:
                    self.forward(blank_batch(b, h, w))
        self([np.full((self.input_size, self.input_size, 3), PAD_VALUE, dtype=np.uint8)])

    def probe(self, image: np.ndarray) -> None:
        """Raise unless a forward on `image` gives finite outputs (a reload's check before it takes traffic)."""
        batch, _ = self.preprocess([image])
        outputs = self.forward(batch)
        if isinstance(outputs, SparseHeadOutputs):  # the box branch too, which the forward left out
            with torch.inference_mode():
                boxes = [outputs.regressor.dense(level, f) for level, f in enumerate(outputs.box_features)]
            outputs = HeadOutputs(outputs.cls_scores, boxes)
        tensors = [t for part in outputs for t in (part if isinstance(part, list) else [part])]
        bad = [tuple(t.shape) for t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"the network gives non-finite outputs (shapes {bad}) on the probe image")
        if not tensors:
            raise ValueError("the network gives no outputs on the probe image")

    def close(self) -> None:
        self.runner.close()


def check_canvas(info: NetworkInfo, cfg: TestConfig) -> None:
    """Refuse the `tight` canvas for a runner whose graph takes only a square input (an export with static
    height and width, or a runtime runner exported for the square): one line at start-up instead of a shape
    error on every batch."""
    if cfg.canvas != "tight":
        return
    if info.fixed_input_size:
        raise ValueError(f"the tight canvas needs a network that takes any height and width; this one "
                         f"({info.backend}) takes only {info.input_size}x{info.input_size}: use the square canvas, "
                         "or export with a dynamic canvas")
    if info.square_only:
        raise ValueError(f"the tight canvas needs a network that takes any height and width; this {info.accelerate} "
                         "runner was made for the square canvas: make the Detector with the tight canvas "
                         "(test_cfg=TestConfig(canvas='tight'))")


def tight_warmup_canvases(size: int, multiple: int) -> list[tuple[int, int]]:
    """The 4:3 landscape and portrait canvases at `size` (640: 480 x 640 and 640 x 480)."""
    short, long = canvas_shape(*resized_shape(3, 4, size), size, multiple)
    return [(short, long), (long, short)] if short != long else []


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
