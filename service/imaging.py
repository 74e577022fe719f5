"""Untrusted bytes -> a BGR uint8 image the detector can take, or a clear error.

Order matters for safety: the byte cap is checked before anything is parsed, the type is sniffed
from the magic bytes (never from what the client claims), and the pixel cap is checked from the
header before any pixel is decoded, so a decompression bomb costs a header read, not gigabytes.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps

from model.config import PAD_VALUE
from model.inference.preprocess import resized_shape
from service.errors import InvalidRequest

SUPPORTED_FORMATS = ("jpeg", "png", "webp", "bmp")
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}
# Content types a raw HTTP body may declare; the bytes are sniffed regardless.
ACCEPTED_CONTENT_TYPES = frozenset({"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/bmp",
                                    "image/x-bmp", "image/x-ms-bmp", "application/octet-stream"})

# Recognised image types we do not accept: they get 415, not "not an image".
_OTHER_SIGNATURES = ((b"GIF87a", "gif"), (b"GIF89a", "gif"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
                     (b"%PDF", "pdf"), (b"\x00\x00\x01\x00", "ico"), (b"8BPS", "psd"), (b"\xff\x0a", "jpeg-xl"),
                     (b"\x00\x00\x00\x0cJXL ", "jpeg-xl"))


# EXIF orientations that `exif_transpose` undoes with a transpose or a quarter turn: width and height swap.
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageError(InvalidRequest):
    """A request image we refuse; `http_status` and `grpc_code` say how each protocol answers."""


class EmptyImage(ImageError):
    pass


class NotAnImage(ImageError):
    pass


class CorruptImage(ImageError):
    pass


class UnsupportedImageType(ImageError):
    http_status = 415


class ImageTooLarge(ImageError):
    """More bytes than `max_upload_bytes`."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class TooManyPixels(ImageError):
    """More pixels than `max_image_pixels` (read from the header, before decoding)."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


def sniff_format(data: bytes) -> str:
    """The image type from its magic bytes: one of SUPPORTED_FORMATS, else an ImageError."""
    if not data:
        raise EmptyImage("empty image: the request carried no bytes")
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM") and len(data) >= 26:
        return "bmp"
    for magic, name in _OTHER_SIGNATURES:
        if data.startswith(magic):
            raise UnsupportedImageType(f"unsupported image type {name}; send JPEG, PNG, WebP or BMP")
    if data[4:8] == b"ftyp":
        raise UnsupportedImageType("unsupported image type (HEIF/AVIF/MP4 container); send JPEG, PNG, WebP or BMP")
    raise NotAnImage("not an image: the bytes are not JPEG, PNG, WebP or BMP")


def check_content_type(content_type: str | None) -> None:
    """Refuse (415) a raw body whose declared type is not an image type we take."""
    base = (content_type or "").split(";")[0].strip().lower()
    if base not in ACCEPTED_CONTENT_TYPES:
        shown = base or "none"
        raise UnsupportedImageType(f"unsupported content type {shown}; send image/jpeg, image/png, image/webp or "
                                   "image/bmp, or a multipart form with an `image` file")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise TooManyPixels(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")


@dataclass(frozen=True)
class DecodedImage:
    """A decoded request image and the size of the upright original it stands for.

    `image` is smaller than `height` x `width` when a JPEG was decoded at a reduced scale (`fit=`): boxes are
    still reported in the original's pixels, by scaling with `original / decoded`."""

    image: np.ndarray  # H x W x 3 uint8 BGR, upright
    height: int
    width: int

    @classmethod
    def full(cls, image: np.ndarray) -> DecodedImage:
        return cls(image, int(image.shape[0]), int(image.shape[1]))

    @property
    def reduced(self) -> bool:
        return (self.image.shape[0], self.image.shape[1]) != (self.height, self.width)

    @property
    def scale(self) -> str:
        """"1", or "1/2", "1/4", "1/8" for a reduced decode (libjpeg rounds the scaled sides up)."""
        factor = round(max(self.height, self.width) / max(self.image.shape[:2]))
        return "1" if not self.reduced or factor <= 1 else f"1/{factor}"


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Encoded JPEG/PNG/WebP/BMP bytes -> H x W x 3 uint8 BGR, upright (EXIF orientation applied)."""
    return decode_image_to_fit(data, max_bytes, max_pixels, None).image


def decode_image_to_fit(data: bytes, max_bytes: int, max_pixels: int, fit: int | None) -> DecodedImage:
    """`decode_image`; with `fit` (the network's input size), a JPEG at least twice as large as its letterboxed
    size on both sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled IDCT), never below
    that letterboxed size. A 4032 x 3024 photo for a 320 input then decodes to 1/64 of its pixels in a fifth to a
    tenth of the time (bench/bench_reduced_decode.py), and the resize to the input starts from an image the
    scaled IDCT has already filtered."""
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}")
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            # PIL warns (then raises) on its own bomb limit; ours is checked explicitly just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[PIL_FORMATS[fmt]])
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"image has too many pixels ({exc})") from None
    except Exception as exc:  # PIL raises several types for garbage headers
        raise CorruptImage(f"cannot read the {fmt} header: {exc}") from None
    check_pixels(img.width, img.height, max_pixels)
    stored_w, stored_h = img.size
    if fit is not None and fmt == "jpeg":
        # Letterboxing's long-side rule is the same for the stored and the upright orientation.
        nh, nw = resized_shape(stored_h, stored_w, fit)
        try:
            img.draft(None, (nw, nh))  # picks the largest 1/s scale that keeps both sides >= (nw, nh)
        except Exception as exc:  # a header PIL opened but cannot scale: the same answer as a failed load
            raise CorruptImage(f"corrupt or truncated {fmt} image: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            swap = img.getexif().get(ExifTags.Base.Orientation, 1) in SWAPPING_ORIENTATIONS
            ImageOps.exif_transpose(img, in_place=True)  # else a copy of every pixel: 57 ms at 12 Mpx here
    except Exception as exc:  # truncated or corrupt pixel data
        raise CorruptImage(f"corrupt or truncated {fmt} image: {exc}") from None
    height, width = (stored_w, stored_h) if swap else (stored_h, stored_w)
    return DecodedImage(_to_bgr(img), height, width)


def _to_bgr(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples: keep the high byte (what 8-bit viewers show); "I" is how PIL may hold 16-bit PNGs.
        gray = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if mode == "F":
        gray = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        return _composite_rgba(np.asarray(img))
    if img.mode == "L":
        return cv2.cvtColor(np.asarray(img), cv2.COLOR_GRAY2BGR)
    if img.mode != "RGB":  # 1, CMYK (PIL undoes Adobe's inversion), YCbCr, LAB, ...
        img = img.convert("RGB")
    return cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)


def _composite_rgba(rgba: np.ndarray) -> np.ndarray:
    """Transparent pixels become the letterbox padding gray, so the model sees them as 'no image'."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + PAD_VALUE * (1.0 - alpha)
    return cv2.cvtColor(np.rint(rgb).astype(np.uint8), cv2.COLOR_RGB2BGR)


def raw_to_bgr(data: bytes, height: int, width: int, channels: int, rgb_order: bool, max_pixels: int) -> np.ndarray:
    """Raw uint8 pixels (gRPC `RawImage`) -> H x W x 3 BGR, with the same pixel cap as encoded images."""
    check_pixels(width, height, max_pixels)
    if channels not in (1, 3, 4):
        raise NotAnImage(f"raw image must have 1, 3 or 4 channels, not {channels}")
    expected = height * width * channels
    if len(data) != expected:
        raise CorruptImage(f"raw image of {height}x{width}x{channels} needs {expected} bytes, got {len(data)}")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    if channels == 1:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
    arr = arr[..., :3]  # alpha of raw frames is ignored
    return np.ascontiguousarray(arr[..., ::-1]) if rgb_order else np.ascontiguousarray(arr)
