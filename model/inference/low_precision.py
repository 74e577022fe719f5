"""Reduced-precision CPU runners, asked for by name only: bfloat16 and INT8 through OpenVINO.

They take the same letterboxed uint8 batch and return the same raw head outputs as the float32 runners
(model.inference.accelerate), but not the same numbers: their outputs are a few 1e-3 of the peak off eager's,
so `auto` (float32, 1e-4 of the peak) never picks them. What that costs in accuracy is measured on the
shapes validation set (README, Performance).

- `openvino-bf16`: the OpenVINO runner with `INFERENCE_PRECISION_HINT=bf16` (convolutions in bfloat16,
  accumulated in float32). Only on a CPU that OpenVINO says computes bfloat16 (AVX512-BF16 or AMX); elsewhere
  OpenVINO would quietly fall back to float32, so it is refused with an error instead.
- `openvino-int8`: post-training quantisation by NNCF (per-channel weights, per-tensor activations, INT8
  convolutions on VNNI/AMX) of the same ONNX export, calibrated on real images the caller gives
  (`calibration`: a folder of images, or the images themselves), letterboxed exactly as the Detector does
  at the serving size. Without calibration images it is an error, never random data: activation ranges
  from noise would not be those of the images it serves. Two choices, measured on the shapes set (tiny,
  320, mAP 0.8443 in float32): the MIXED preset (asymmetric activations: SiLU outputs reach below zero, which a
  symmetric range spends half its codes on) and the head's last convolutions (the class logits and box
  distances themselves) kept in float32. Default preset, all quantised: 0.8326; MIXED alone 0.8372; head in
  float32 alone 0.8379; both 0.8415. Those six small convolutions are a sliver of the compute. Layers NNCF
  does not quantise run in float32.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.data.instances import IMAGE_SUFFIXES  # what the datasets read as images
from model.errors import UserError
from model.inference.onnx_runners import OpenVINORunner, openvino_core
from model.inference.preprocess import letterbox

log = logging.getLogger("rtmdet.runner")
BF16_MODE = "openvino-bf16"
INT8_MODE = "openvino-int8"
CALIBRATION_IMAGES = 300  # NNCF's own default subset size: enough for stable activation ranges


class LowPrecisionUnavailable(UserError, ValueError):
    """A reduced-precision runner that cannot run here (CPU, package, calibration data): one line that says why."""


@dataclass(frozen=True)
class Calibration:
    """Images to calibrate INT8 on: a folder (searched recursively for image files, taken in name order) or
    BGR uint8 arrays; at most `max_images` are used."""

    source: Path | tuple[np.ndarray, ...]
    max_images: int = CALIBRATION_IMAGES

    @classmethod
    def of(cls, value: Calibration | str | Path | Sequence[np.ndarray] | None) -> Calibration | None:
        """The caller's `calibration=` as a Calibration, checked now (a folder must exist and hold images)."""
        if value is None or isinstance(value, Calibration):
            return value
        if isinstance(value, (str, Path)):
            folder = Path(value)
            if not folder.is_dir():
                raise LowPrecisionUnavailable(f"calibration folder {folder} not found")
            if not _image_files(folder, 1):
                raise LowPrecisionUnavailable(f"calibration folder {folder} holds no images "
                                              f"({', '.join(IMAGE_SUFFIXES)})")
            return cls(folder)
        images = tuple(value)
        if not images:
            raise LowPrecisionUnavailable("calibration: no images given")
        return cls(images)

    def images(self) -> list[np.ndarray]:
        if not isinstance(self.source, Path):
            return list(self.source[:self.max_images])
        from model.inference.detector import load_image

        return [load_image(p) for p in _image_files(self.source, self.max_images)]

    def letterboxed(self, size: int) -> list[np.ndarray]:
        """Each image as the Detector feeds it to a runner: a (1, size, size, 3) uint8 batch."""
        return [letterbox(img, size)[0][None] for img in self.images()]


def _image_files(folder: Path, limit: int) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return found[:limit]


def require_bf16(capabilities: Sequence[str]) -> None:
    """Raise unless OpenVINO's CPU `OPTIMIZATION_CAPABILITIES` include bfloat16 arithmetic (without it the
    plugin would quietly run float32 under the bf16 name)."""
    if "BF16" not in capabilities:
        raise LowPrecisionUnavailable(
            f"{BF16_MODE}: this CPU does not compute bfloat16 (OpenVINO CPU capabilities: {', '.join(capabilities)}); "
            "it needs AVX512-BF16 or AMX")


def openvino_cpu_capabilities() -> list[str]:
    try:
        core = openvino_core()
    except ImportError:
        raise LowPrecisionUnavailable("the OpenVINO runners need openvino: pip install 'rtmdet-serve[export]'") \
            from None
    return list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_available(mode: str, calibration: Calibration | None) -> None:
    """Raise LowPrecisionUnavailable (one line) unless `mode` can run on this machine with what was given;
    called when the Detector is made, so a mistake shows at start-up rather than on the first batch. Images
    given to any other mode are refused too: ignoring them would let a typo in the mode pass for INT8."""
    if calibration is not None and mode != INT8_MODE:
        raise LowPrecisionUnavailable(f"calibration images are only used by {INT8_MODE}; accelerate={mode} would "
                                      "ignore them (drop --calibration, or ask for openvino-int8)")
    if mode not in (BF16_MODE, INT8_MODE):
        return
    if mode == INT8_MODE and calibration is None:
        raise LowPrecisionUnavailable(
            f"{INT8_MODE} needs calibration images: Detector(calibration=FOLDER), --calibration FOLDER, or "
            "calibration=FOLDER in --model (real images like those it will serve; never random data)")
    capabilities = openvino_cpu_capabilities()
    if mode == BF16_MODE:
        require_bf16(capabilities)
    if mode == INT8_MODE:
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise LowPrecisionUnavailable(f"{INT8_MODE} needs nncf: pip install 'rtmdet-serve[export]'") from None


def output_convolutions(model) -> list[str]:
    """Names of the convolutions that compute the graph's outputs (the head's last layers), walking back from
    each output through the ops after them (e.g. the box distances' scale)."""
    names = []
    for result in model.outputs:
        node = result.get_node()
        while node.get_type_name() != "Convolution":
            node = node.input_value(0).get_node()
        names.append(node.get_friendly_name())
    return names


class OpenVINOBF16Runner(OpenVINORunner):
    """OpenVINO's CPU plugin in bfloat16 (see the module docstring)."""

    name = BF16_MODE

    def __init__(self, path: str | Path, threads: int) -> None:
        check_available(BF16_MODE, None)
        super().__init__(path, threads)
        for config in self.configs.values():  # a batch of one and a batch cut over streams alike
            config["INFERENCE_PRECISION_HINT"] = "bf16"
        log.info("%s: OpenVINO CPU, bfloat16, %d threads", BF16_MODE, threads)


class OpenVINOInt8Runner(OpenVINORunner):
    """The ONNX export quantised to INT8 by NNCF on calibration batches, then OpenVINO's CPU plugin."""

    name = INT8_MODE

    def __init__(self, path: str | Path, threads: int, calibration: Calibration | None, input_size: int) -> None:
        check_available(INT8_MODE, calibration)
        import nncf

        super().__init__(path, threads)
        t0 = time.perf_counter()
        batches = calibration.letterboxed(input_size)
        self.calibration_images = len(batches)
        nncf.set_log_level(logging.WARNING)  # not a line per layer it leaves alone
        self.model = nncf.quantize(self.model, nncf.Dataset(batches), subset_size=len(batches),
                                   preset=nncf.QuantizationPreset.MIXED,
                                   ignored_scope=nncf.IgnoredScope(names=output_convolutions(self.model)))
        log.info("%s: quantised by NNCF on %d calibration images at %d in %.1f s", INT8_MODE, len(batches),
                 input_size, time.perf_counter() - t0)


def build_low_precision_runner(mode: str, path: str | Path, threads: int, input_size: int,
                               calibration: Calibration | None = None):
    if mode == BF16_MODE:
        return OpenVINOBF16Runner(path, threads)
    if mode == INT8_MODE:
        return OpenVINOInt8Runner(path, threads, calibration, input_size)
    raise ValueError(f"no reduced-precision runner {mode!r}")
