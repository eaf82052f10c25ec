"""One image as the networks see it, following the course: composite transparency onto white,
pad to a white square keeping the aspect ratio, resize, stretch each channel's contrast."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

PREPROCESS_VERSION = 2  # bump when preprocess() changes: invalidates every disk cache entry


def _to_rgb_on_white(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale: scale to 8 bit
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8), "L")
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")  # a palette's or a colour key's (PNG tRNS) transparency
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        # Gear PNGs hide near-black pixels under the alpha: convert("RGB") would show them.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, RGB, 16-bit RGB


def on_white(img: Image.Image) -> Image.Image:
    """The photo as it is seen: upright (EXIF orientation), RGB, transparency on white."""
    return _to_rgb_on_white(ImageOps.exif_transpose(img))


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 array (3, size, size)."""
    return preprocess_on_white(on_white(img), size)


def preprocess_on_white(img: Image.Image, size: int) -> np.ndarray:
    """preprocess() of an image on_white() gave."""
    img = ImageOps.pad(img, (size, size), method=Image.Resampling.BILINEAR, color="white")
    # Each channel's contrast stretch as a 256-entry table (PIL applies it in C): the same
    # float32 arithmetic as on the whole array, so the same bytes, at a tenth of the time (a
    # served photo's preprocessing was half a millisecond of float arrays).
    levels = np.arange(256, dtype=np.float32)
    tables = []
    for lo, hi in img.getextrema():
        if hi > lo:
            stretched = (levels - np.float32(lo)) * 255.0 / np.maximum(np.float32(hi - lo), 1e-6)
            tables.append(np.clip(stretched.round(), 0, 255).astype(np.uint8))  # clip: unused
        else:
            tables.append(levels.astype(np.uint8))
    img = img.point(np.concatenate(tables).tolist())
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
