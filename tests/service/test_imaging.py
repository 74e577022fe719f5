"""bytes -> BGR: formats, colour modes, orientation, and every way an upload can be refused."""
from __future__ import annotations

import io
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from service.imaging import (
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    NotAnImage,
    TooManyPixels,
    UnsupportedImageType,
    check_content_type,
    decode_image,
    raw_to_bgr,
    sniff_format,
)

MB = 1 << 20


def decode(data: bytes, max_bytes: int = 8 * MB, max_pixels: int = 4_000_000) -> np.ndarray:
    return decode_image(data, max_bytes, max_pixels)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data
    return np.ascontiguousarray(cv2.resize(data.astronaut(), (96, 64))[..., ::-1])  # BGR, 64 x 96


def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_lossless_formats_decode_to_the_exact_pixels(photo, ext):
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []  # >100 is lossless WebP
    ok, buf = cv2.imencode(ext, photo, params)
    assert ok
    np.testing.assert_array_equal(decode(buf.tobytes()), photo)


def test_jpeg_decodes_like_opencv(photo):
    data = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    ours = decode(data).astype(int)
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert ours.shape == photo.shape
    assert np.abs(ours - ref).max() <= 2  # both libjpeg; upsampling details may differ by a level


def test_grayscale_becomes_three_equal_channels(photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    out = decode(cv2.imencode(".png", gray)[1].tobytes())
    assert out.shape == (*gray.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_16_bit_grayscale_and_colour_keep_the_high_byte(photo):
    wide = photo.astype(np.uint16) * 256 + 100  # high byte = the 8-bit value
    np.testing.assert_array_equal(decode(cv2.imencode(".png", wide)[1].tobytes()), photo)
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    out = decode(cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes())
    np.testing.assert_array_equal(out[..., 1], gray)


def test_rgba_is_composited_over_the_padding_gray(photo):
    rgba = np.dstack([photo[..., ::-1], np.full(photo.shape[:2], 255, np.uint8)])
    rgba[:, :48, 3] = 0  # left half fully transparent
    rgba[:, 48:64, 3] = 128
    out = decode(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")).astype(int)
    assert (out[:, :48] == 114).all()
    np.testing.assert_array_equal(out[:, 64:], photo[:, 64:])
    half = np.rint(photo[:, 48:64] * (128 / 255) + 114 * (127 / 255))
    assert np.abs(out[:, 48:64] - half).max() <= 1


def test_cmyk_jpeg_comes_back_as_the_right_colours(photo):
    rgb = Image.fromarray(np.ascontiguousarray(photo[..., ::-1]))
    data = pil_bytes(rgb.convert("CMYK"), "JPEG", quality=98)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(data).astype(int)
    assert np.abs(out - photo.astype(int)).mean() < 4  # JPEG loss only; inverted or swapped would be ~100


def test_exif_orientation_is_applied():
    img = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall; left half red (RGB)
    img[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    data = pil_bytes(Image.fromarray(img), "JPEG", quality=95, exif=exif)
    out = decode(data)
    assert out.shape == (40, 20, 3)  # upright: taller than wide
    # The red half (BGR channel 2) is now on top.
    assert out[:18, :, 2].mean() > 200 and out[22:, :, 2].mean() < 50


def test_palette_png_with_transparency(photo):
    pal = Image.fromarray(np.ascontiguousarray(photo[..., ::-1])).convert("P")
    pal.info["transparency"] = 0
    out = decode(pil_bytes(pal, "PNG", transparency=0))
    assert out.shape == photo.shape and out.dtype == np.uint8


@pytest.mark.parametrize("data, error", [
    (b"", EmptyImage),
    (b"hello, this is plain text and not an image at all", NotAnImage),
    (b"GIF89a" + b"\x00" * 40, UnsupportedImageType),
    (b"II*\x00" + b"\x00" * 40, UnsupportedImageType),
    (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40, UnsupportedImageType),
])
def test_refusals_by_content(data, error):
    with pytest.raises(error):
        decode(data)


def test_truncated_jpeg_and_png_are_refused(photo):
    for ext in (".jpg", ".png"):
        data = cv2.imencode(ext, photo)[1].tobytes()
        with pytest.raises(CorruptImage):
            decode(data[: len(data) // 2])


def test_garbage_after_a_valid_signature_is_refused():
    with pytest.raises(CorruptImage):
        decode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)


def test_byte_cap_is_checked_first():
    with pytest.raises(ImageTooLarge):
        decode(b"\xff\xd8\xff" + b"\x00" * 2000, max_bytes=1024)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels but whose pixel data is garbage."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"junk") + chunk(b"IEND", b"")


def test_pixel_cap_is_checked_from_the_header_before_decoding():
    # If the decoder ran, this file would fail as corrupt; the header check must refuse it first, and fast.
    t0 = time.perf_counter()
    with pytest.raises(TooManyPixels, match="3000x3000"):
        decode(png_header_only(3000, 3000), max_pixels=4_000_000)
    with pytest.raises(TooManyPixels, match="pixels"):  # beyond PIL's own bomb limit too
        decode(png_header_only(50_000, 50_000))
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(CorruptImage):  # the same file under the cap reaches the decoder
        decode(png_header_only(100, 100))


def test_a_real_decompression_bomb_is_refused():
    bomb = cv2.imencode(".png", np.zeros((3000, 3000), np.uint8))[1].tobytes()  # 9 Mpx in a few KB
    assert len(bomb) < 64 * 1024
    with pytest.raises(TooManyPixels):
        decode(bomb, max_pixels=4_000_000)


def test_sniffing_ignores_the_claimed_type(photo):
    assert sniff_format(cv2.imencode(".png", photo)[1].tobytes()) == "png"
    assert sniff_format(cv2.imencode(".bmp", photo)[1].tobytes()) == "bmp"


@pytest.mark.parametrize("ctype", ["image/jpeg", "image/png; charset=binary", "IMAGE/WEBP", "image/bmp",
                                   "application/octet-stream"])
def test_image_content_types_pass(ctype):
    check_content_type(ctype)


@pytest.mark.parametrize("ctype", [None, "", "text/plain", "application/json", "image/gif", "image/tiff"])
def test_other_content_types_are_unsupported(ctype):
    with pytest.raises(UnsupportedImageType):
        check_content_type(ctype)


def test_raw_pixels(photo):
    h, w = photo.shape[:2]
    np.testing.assert_array_equal(raw_to_bgr(photo.tobytes(), h, w, 3, False, 10**6), photo)
    rgb = np.ascontiguousarray(photo[..., ::-1])
    np.testing.assert_array_equal(raw_to_bgr(rgb.tobytes(), h, w, 3, True, 10**6), photo)
    gray = photo[..., 0].copy()
    assert raw_to_bgr(gray.tobytes(), h, w, 1, False, 10**6).shape == (h, w, 3)
    with pytest.raises(CorruptImage):
        raw_to_bgr(photo.tobytes()[:-1], h, w, 3, False, 10**6)
    with pytest.raises(TooManyPixels):
        raw_to_bgr(photo.tobytes(), h, w, 3, False, h * w - 1)
    with pytest.raises(NotAnImage):
        raw_to_bgr(photo.tobytes(), h, w, 2, False, 10**6)
