"""What loading a data set returns (`ImageSet`), whichever source it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from equip.data._imagestore import DiskImages


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor | DiskImages  # uint8, (N, 3, S, S): in RAM, or streamed from the cache
    labels: torch.Tensor  # int64, (N,)
    classes: list[str]
    paths: list[str]
    sha256: list[str]
    fingerprint: str  # changes with any file's content, its class, or the preprocessing
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of unreadable files
    source: str = "decoded"  # decoded | disk-cache | memory
    decoded: int = 0  # files decoded by this load (0 when everything came from a cache)
    # uint64 per image: the photo's dHash (equip.data.grouping), computed when it was decoded;
    # None for a set that has no photos (the drawn set: grouping hashes its pixels if asked)
    dhash: np.ndarray | None = None
