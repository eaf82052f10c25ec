"""Procedurally drawn "synthetic equipment" photos: one recognisable shape per class.

Each image has its own RNG keyed by (seed, class, index), so image i of class c does not depend on
per_class. Pose, scale, position, colours, background clutter and noise vary per image so that a
raw-pixel linear model fails where a small CNN learns the shapes.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from equip.data import _shapes
from equip.data._shapes import Gen, Pen, Rgb

CLASSES: tuple[str, ...] = (
    "axes",
    "boots",
    "carabiners",
    "crampons",
    "gloves",
    "hardshell_jackets",
    "harnesses",
    "helmets",
    "insulated_jackets",
    "pulleys",
    "rope",
    "tents",
)

# The drawing of each class, in CLASSES order.
DRAW: dict[str, Callable[[Pen, Gen], None]] = dict(
    zip(
        CLASSES,
        (
            _shapes.axe,
            _shapes.boot,
            _shapes.carabiner,
            _shapes.crampons,
            _shapes.glove,
            _shapes.hardshell,
            _shapes.harness,
            _shapes.helmet,
            _shapes.insulated,
            _shapes.pulley,
            _shapes.rope,
            _shapes.tent,
        ),
        strict=True,
    )
)


def _colour(r: Gen, light: bool) -> np.ndarray:
    # Light: near-white, slightly tinted backdrops as in product photos; otherwise any colour.
    s_max, v = (0.15, (0.78, 1.0)) if light else (0.7, (0.15, 0.85))
    return np.array(colorsys.hsv_to_rgb(r.random(), r.uniform(0, s_max), r.uniform(*v))) * 255


def _lum(c: np.ndarray) -> float:
    return float(c @ np.array([0.299, 0.587, 0.114]))


def _rgb(c: np.ndarray) -> Rgb:
    return int(c[0]), int(c[1]), int(c[2])


def _background(r: Gen, size: int) -> tuple[Image.Image, np.ndarray]:
    c0 = _colour(r, light=r.random() < 0.75)
    c1 = np.clip(c0 + r.uniform(-45, 45, 3), 0, 255)
    a, g = r.uniform(0, 2 * np.pi), np.linspace(-0.5, 0.5, size, dtype=np.float32)
    t = np.clip(0.5 + np.cos(a) * g[None, :] + np.sin(a) * g[:, None], 0, 1)  # linear gradient
    mask = Image.fromarray((t * 255).astype(np.uint8), "L")
    solid = [Image.new("RGB", (size, size), _rgb(c)) for c in (c0, c1)]
    return Image.composite(solid[1], solid[0], mask), (c0 + c1) / 2


def _clutter(img: Image.Image, r: Gen, bg: np.ndarray) -> None:
    """Faint random lines, blobs and small polygons: distractors that are never a class shape."""
    d, s = ImageDraw.Draw(img), img.width
    for _ in range(int(r.integers(2, 7))):
        c = _rgb(bg + (r.uniform(0, 255, 3) - bg) * r.uniform(0.15, 0.45))
        (x, y), e, kind = r.uniform(0, s, 2), r.uniform(0.04, 0.16) * s, r.integers(3)
        if kind == 0:
            end = (x + r.uniform(-0.5, 0.5) * s, y + r.uniform(-0.5, 0.5) * s)
            d.line([(x, y), end], fill=c, width=max(1, int(r.uniform(0.005, 0.02) * s)))
        elif kind == 1:
            d.ellipse([x - e, y - e * r.uniform(0.4, 1), x + e, y + e], fill=c)
        else:
            d.polygon([(x + r.uniform(-e, e), y + r.uniform(-e, e)) for _ in range(4)], fill=c)


def _draw_one(c: int, r: Gen, image_size: int) -> np.ndarray:
    big = 2 * image_size  # drawn at 2x, downsampled with LANCZOS for anti-aliasing
    img, bg = _background(r, big)
    _clutter(img, r, bg)
    for _ in range(10):  # the object must stand out from its background, as in a product photo
        fg = _colour(r, light=False)
        if abs(_lum(fg) - _lum(bg)) > 70:
            break
    else:
        fg = np.full(3, 30.0 if _lum(bg) > 128 else 230.0)
    dark = fg * 0.45 if _lum(fg) > 90 else fg + (255 - fg) * 0.55  # details: a shade of the colour
    layer = Image.new("RGBA", (big, big), (*_rgb(fg), 0))  # transparent fg colour: no dark fringe
    DRAW[CLASSES[c]](Pen(layer, _rgb(fg), _rgb(dark)), r)

    # Pose: rotation, scale, mirror and offset in one affine resample (one blur, not four). Ranges
    # tuned at 64 px: raw-pixel logistic regression ~0.35 test accuracy, a 2-conv CNN ~0.87.
    th, scale, flip = np.radians(r.uniform(-20, 20)), r.uniform(0.7, 1.0), r.choice([-1.0, 1.0])
    m = np.array([[flip * np.cos(th), flip * np.sin(th)], [-np.sin(th), np.cos(th)]]) / scale
    ctr = np.full(2, big / 2)
    off = ctr - m @ (ctr + r.uniform(-0.1, 0.1, 2) * big)
    data = (m[0, 0], m[0, 1], off[0], m[1, 0], m[1, 1], off[1])
    layer = layer.transform(img.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    img.paste(layer, mask=layer)
    small = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    arr = np.asarray(small, dtype=np.float32) * r.uniform(0.85, 1.1)  # exposure
    arr += r.standard_normal(arr.shape, np.float32) * r.uniform(2, 8)  # sensor noise
    return np.clip(arr, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def make_synthetic(per_class: int, image_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (images, labels): images uint8 array of shape (N, 3, image_size, image_size) (channels
    first), labels int64 array of shape (N,) indexing CLASSES; N = per_class * 12, ordered class by
    class."""
    n = per_class * len(CLASSES)
    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    for k, im in enumerate(iter_synthetic(per_class, image_size, seed)):
        images[k] = im
    return images, synthetic_labels(per_class)


def synthetic_labels(per_class: int) -> np.ndarray:
    return np.repeat(np.arange(len(CLASSES), dtype=np.int64), per_class)


def iter_synthetic(per_class: int, image_size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The images of make_synthetic one at a time, in the same order: a large set can be
    written to disk without ever being whole in RAM."""
    for k in range(per_class * len(CLASSES)):
        c, i = divmod(k, per_class)
        # Keyed by (seed, class, index), not by position: image i of class c ignores per_class.
        rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, c, i]))
        yield _draw_one(c, rng, image_size)
