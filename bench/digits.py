"""scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as a class-per-folder PNG tree,
dark ink on white like a scanned page: the small-image target of issue 17.

    python bench/digits.py OUT_DIR      # OUT_DIR/<digit>/<index>.png, then e.g.
    python train.py data=folder data.root=OUT_DIR data.image_size=32
    python train.py experiment=small_images data.root=OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: Path) -> int:
    """Write every digit as an 8x8 greyscale PNG; returns how many were written."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 ink -> 255..0 grey: dark on white, as the preprocessing's white padding expects
    pixels = (255 - np.round(digits.images * 255 / 16)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / f"{i:04d}.png")
    return len(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the class folders into")
    n = write_digits(parser.parse_args().out)
    print(f"wrote {n} digits")


if __name__ == "__main__":
    main()
