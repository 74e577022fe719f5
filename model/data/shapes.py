"""A synthetic COCO-format detection set: coloured shapes on photographic or textured backgrounds.

Each image is drawn from its own RNG, seeded by (seed, split, index), so image i of a split is the same whatever
n_train/n_val are and the whole set is byte-identical for a seed on the same OpenCV build. Boxes are the exact
extent of the drawn geometry (polygon vertices, or centre +- radius for circles), so a detector can learn tight
boxes; occlusion between shapes is bounded so that every annotated object stays mostly visible.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "hexagon")


@dataclass(frozen=True)
class ShapesConfig:
    """How the images are drawn. Sizes are fractions of the image's long side, so they scale with img_size."""

    img_size: int = 320  # long side in pixels; the short side is drawn in [min_aspect, 1] * img_size
    min_aspect: float = 0.6
    min_objects: int = 1
    max_objects: int = 10
    min_object_px: float = 12.0  # smallest object extent in pixels (COCO "small" starts below 32 px)
    max_object_frac: float = 0.6  # largest object extent as a fraction of the short side
    max_cover: float = 0.4  # a new shape may hide at most this fraction of an earlier one's box (and vice versa)
    jpeg_quality: int = 92


# Photos shipped inside scikit-image itself (no download); grey ones are tinted when used.
_PHOTO_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "camera", "grass", "gravel", "brick", "moon", "coins", "cell", "clock",
)


def _load_photos() -> list[np.ndarray]:
    """Every bundled scikit-image photo as BGR uint8; missing ones are skipped (textures still work)."""
    try:
        import skimage.data as skdata
    except ImportError:  # scikit-image is a dev dependency; procedural textures suffice without it
        return []
    photos = []
    for name in _PHOTO_NAMES:
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - a photo needing a download, or absent in this version: skip it
            continue
        if img.dtype != np.uint8:
            continue
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGR)
        else:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        photos.append(np.ascontiguousarray(img))
    return photos


def _photo_background(rng: np.random.Generator, photos: list[np.ndarray], h: int, w: int) -> np.ndarray:
    src = photos[int(rng.integers(len(photos)))]
    sh, sw = src.shape[:2]
    # A random crop of 40-100% of the photo, stretched to the canvas: many distinct backgrounds from few photos.
    frac = rng.uniform(0.4, 1.0)
    ch, cw = max(8, int(sh * frac)), max(8, int(sw * frac))
    y0, x0 = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    bg = cv2.resize(src[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    tint = rng.uniform(0.6, 1.3, size=3)
    return np.clip(bg.astype(np.float32) * tint, 0, 255).astype(np.uint8)


def _texture_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = int(rng.integers(4))
    base = rng.uniform(30, 225, size=3).astype(np.float32)
    if kind == 0:  # smooth blobs: upsampled noise
        small = rng.uniform(-60, 60, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
        img = base + cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # stripes at a random angle
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        wave = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / period))
        img = base + wave[..., None] * rng.uniform(-50, 50, size=3).astype(np.float32)
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(8, 48))
        yy, xx = np.mgrid[0:h, 0:w]
        board = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
        img = base + board[..., None] * rng.uniform(-70, 70, size=3).astype(np.float32)
    else:  # fine grain noise
        img = base + rng.normal(0, rng.uniform(5, 35), size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float) -> np.ndarray:
    t = angle + np.arange(n) * (2 * math.pi / n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _star(cx: float, cy: float, r: float, angle: float, inner: float) -> np.ndarray:
    t = angle + np.arange(10) * (math.pi / 5)
    radius = np.where(np.arange(10) % 2 == 0, r, r * inner)
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _shape_outline(label: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray | None:
    """Vertices (K, 2) float of the shape, or None for a circle."""
    angle = rng.uniform(0, 2 * math.pi)
    name = SHAPE_CLASSES[label]
    if name == "circle":
        return None
    if name == "square":
        return _regular_polygon(cx, cy, r, 4, angle)
    if name == "triangle":
        return _regular_polygon(cx, cy, r, 3, angle)
    if name == "star":
        return _star(cx, cy, r, angle, inner=rng.uniform(0.38, 0.5))
    return _regular_polygon(cx, cy, r, 6, angle)


def _contrasting_colour(rng: np.random.Generator, local_mean: np.ndarray) -> np.ndarray:
    """A random colour far enough from the background under the shape that the shape has a visible edge."""
    best, best_d = None, -1.0
    for _ in range(8):
        c = rng.uniform(0, 255, size=3)
        d = float(np.abs(c - local_mean).sum())
        if d > 150:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _overlap_ok(box: np.ndarray, boxes: list[np.ndarray], max_cover: float) -> bool:
    area = (box[2] - box[0]) * (box[3] - box[1])
    for b in boxes:
        iw = min(box[2], b[2]) - max(box[0], b[0])
        ih = min(box[3], b[3]) - max(box[1], b[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        if inter > max_cover * (b[2] - b[0]) * (b[3] - b[1]) or inter > max_cover * area:
            return False
    return True


_SUPERSAMPLE = 4


def _paint_polygon(img: np.ndarray, outline: np.ndarray, colour: tuple[float, float, float]) -> None:
    """Fill `outline` (continuous coordinates: pixel i spans [i, i+1]) into `img` with exact-coverage antialiasing.

    cv2's LINE_AA polygons spill up to a pixel beyond the true edge, which would make boxes loose; instead the
    shape is rasterised without AA at 4x resolution inside its box and averaged down to a coverage mask.
    """
    h, w = img.shape[:2]
    x0, y0 = int(math.floor(outline[:, 0].min())), int(math.floor(outline[:, 1].min()))
    x1, y1 = min(w, int(math.ceil(outline[:, 0].max()))), min(h, int(math.ceil(outline[:, 1].max())))
    s = _SUPERSAMPLE
    mask = np.zeros(((y1 - y0) * s, (x1 - x0) * s), np.uint8)
    # cv2 puts a pixel's centre at its integer index, so continuous c maps to c*s - 0.5 (x16 for shift=4).
    pts = np.round(((outline - (x0, y0)) * s - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [pts], 255, cv2.LINE_8, shift=4)
    alpha = cv2.resize(mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)[..., None] / 255
    patch = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = np.clip(patch * (1 - alpha) + np.array(colour, np.float32) * alpha + 0.5, 0, 255).astype(
        np.uint8)


@dataclass
class ShapeObject:
    label: int
    box: np.ndarray  # xyxy float
    polygon: np.ndarray  # (K, 2) outline used for segmentation and area
    area: float


def draw_shapes_on(img: np.ndarray, rng: np.random.Generator, cfg: ShapesConfig) -> list[ShapeObject]:
    """Draw 1..max_objects shapes into `img` (in place) and return them; each lies wholly inside the image."""
    h, w = img.shape[:2]
    objects: list[ShapeObject] = []
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    min_r = cfg.min_object_px / 2
    max_r = max(min_r * 1.5, cfg.max_object_frac * min(h, w) / 2)
    for _ in range(n_target * 6):  # rejection sampling for placement; bounded attempts
        if len(objects) >= n_target:
            break
        label = int(rng.integers(len(SHAPE_CLASSES)))
        r = float(math.exp(rng.uniform(math.log(min_r), math.log(max_r))))  # log-uniform: small to large
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        outline = _shape_outline(label, cx, cy, r, rng)
        if outline is None:
            box = np.array([cx - r, cy - r, cx + r, cy + r])
            outline = _regular_polygon(cx, cy, r, 64, 0.0)
        else:
            box = np.array([*outline.min(0), *outline.max(0)])
        # The whole shape inside the image: annotated boxes are never truncated guesses.
        if box[0] < 0 or box[1] < 0 or box[2] > w - 1 or box[3] > h - 1:
            continue
        if not _overlap_ok(box, [o.box for o in objects], cfg.max_cover):
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        local = img[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3).mean(0)
        colour = tuple(float(c) for c in _contrasting_colour(rng, local))
        _paint_polygon(img, outline, colour)
        area = float(abs(cv2.contourArea(outline.astype(np.float32))))
        objects.append(ShapeObject(label, box.astype(np.float32), outline, area))
    return objects


def draw_shapes_image(
    rng: np.random.Generator, cfg: ShapesConfig, photos: list[np.ndarray]
) -> tuple[np.ndarray, list[ShapeObject]]:
    """One BGR image and its objects, drawn from `rng` alone."""
    long_side = cfg.img_size
    short_side = int(round(long_side * rng.uniform(cfg.min_aspect, 1.0)))
    h, w = (short_side, long_side) if rng.random() < 0.5 else (long_side, short_side)
    if photos and rng.random() < 0.6:
        img = _photo_background(rng, photos, h, w)
    else:
        img = _texture_background(rng, h, w)
    img = np.ascontiguousarray(img)

    objects = draw_shapes_on(img, rng, cfg)

    # Mild sensor noise and blur so edges are not perfectly synthetic.
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.3, 1.0))
    sigma = np.float32(rng.uniform(0, 6))
    noisy = rng.standard_normal(size=img.shape, dtype=np.float32)
    noisy *= sigma
    noisy += img
    img = np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)
    return img, objects


def _split_seed(seed: int, split: str, index: int) -> list[int]:
    return [int(seed), {"train": 0, "val": 1}[split], int(index)]


def _write_split(out: Path, split: str, n: int, seed: int, cfg: ShapesConfig, photos: list[np.ndarray]) -> dict:
    img_dir = out / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(n):
        rng = np.random.default_rng(_split_seed(seed, split, i))
        img, objects = draw_shapes_image(rng, cfg, photos)
        file_name = f"{i:06d}.jpg"
        ok = cv2.imwrite(str(img_dir / file_name), img, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
        if not ok:
            raise OSError(f"could not write {img_dir / file_name}")
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": int(img.shape[0]),
                       "width": int(img.shape[1])})
        for obj in objects:
            x0, y0, x1, y1 = (float(v) for v in obj.box)
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": obj.label + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round(obj.area, 2), "iscrowd": 0,
                "segmentation": [[round(float(v), 2) for v in obj.polygon.reshape(-1)]],
            })
            ann_id += 1
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPE_CLASSES)]
    return {"info": {"description": f"rtmdet-serve synthetic shapes, seed {seed}, split {split}"},
            "images": images, "annotations": annotations, "categories": categories}


def make_shapes_dataset(out_dir: str | Path, n_train: int, n_val: int, seed: int = 0, img_size: int = 320,
                        config: ShapesConfig | None = None) -> dict[str, Path]:
    """Write `out/{train,val}/*.jpg` and `out/annotations/instances_{train,val}.json`; returns the JSON paths."""
    cfg = dataclasses.replace(config or ShapesConfig(), img_size=img_size)
    if cfg.img_size < 32:
        raise ValueError(f"img_size must be at least 32, got {cfg.img_size}")
    out = Path(out_dir)
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    photos = _load_photos()
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        coco = _write_split(out, split, n, seed, cfg, photos)
        path = ann_dir / f"instances_{split}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(coco))
        tmp.replace(path)
        paths[split] = path
    return paths
