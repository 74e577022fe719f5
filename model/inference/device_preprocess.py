"""JPEG decode and letterbox on the inference device (the GPU path; the same code runs on the CPU).

On CUDA, `torchvision.io.decode_jpeg(..., device="cuda")` decodes with nvJPEG: the CPU only parses the
headers, and the pixels never cross PCIe as a full-size image. The letterbox then resizes on the device.
The result is the uint8 (B, S, S, 3) BGR batch that `Detector.forward` takes, plus the same
`LetterboxInfo`s as the CPU path, so post-processing is unchanged.

Not bit-identical to the cv2 path: cv2's bilinear resize of uint8 uses 11-bit fixed-point weights while
this one interpolates in float and rounds, and nvJPEG's IDCT may differ from libjpeg-turbo's by a level or two.
Pixels differ by at most a few levels; the size rule, padding and the infos are identical.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from model.config import PAD_VALUE
from model.inference.preprocess import LetterboxInfo, canvas_shape, resized_shape


def decode_jpegs(data: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor]:
    """JPEG bytes -> RGB uint8 (3, H, W) tensors on `device`, the batch decoded in one call."""
    # Imported here: the whole torchvision package comes with it (seconds), and only this path needs it.
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    with warnings.catch_warnings():
        # torchvision 0.29 marks its codecs deprecated in favour of TorchCodec; they still work, and
        # torchvision is already a dependency.
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=torch.device(device)))


def letterbox_rgb_chw(images: Sequence[torch.Tensor], size: int,
                      multiple: int | None = None) -> tuple[torch.Tensor, list[LetterboxInfo]]:
    """RGB uint8 (3, H, W) images (any device) -> BGR uint8 (B, size, size, 3) letterboxed batch and infos; with
    `multiple`, the `tight` canvas (B, H, W, 3) that holds every image rounded up to multiples of it.

    Same rule as `preprocess.letterbox`: long side to `size` (MMDetection's rounding), bilinear with
    half-pixel centres (as cv2.INTER_LINEAR), padded bottom/right with 114.
    """
    if not images:
        raise ValueError("no images")
    for img in images:
        if img.ndim != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
            raise ValueError(f"expected a 3 x H x W uint8 RGB tensor, got {img.dtype} {tuple(img.shape)}")
    device = images[0].device
    resized_shapes = [resized_shape(*img.shape[1:], size) for img in images]
    canvases = [canvas_shape(nh, nw, size, multiple) for nh, nw in resized_shapes]
    out = torch.full((len(images), max(h for h, _ in canvases), max(w for _, w in canvases), 3), PAD_VALUE,
                     dtype=torch.uint8, device=device)
    infos = []
    for i, (img, (nh, nw)) in enumerate(zip(images, resized_shapes, strict=True)):
        h, w = img.shape[1:]
        if (nh, nw) == (h, w):
            resized = img
        else:
            resized = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
            resized = resized.round_().clamp_(0, 255).to(torch.uint8)
        out[i, :nh, :nw] = resized.flip(0).permute(1, 2, 0)  # RGB CHW -> BGR HWC
        infos.append(LetterboxInfo(int(h), int(w), nw / w, nh / h))
    return out, infos


def preprocess_jpegs(data: Sequence[bytes], size: int, device: torch.device | str,
                     multiple: int | None = None) -> tuple[torch.Tensor, list[LetterboxInfo]]:
    """JPEG bytes -> the letterboxed uint8 batch on `device` and its infos (`multiple`: the `tight` canvas, as
    `letterbox_rgb_chw`): decode and resize never touch the host's pixels when `device` is a GPU."""
    return letterbox_rgb_chw(decode_jpegs(data, device), size, multiple)
