"""From an ImageSet and its split to Lightning: augmentation, datasets, loaders, sharding.

Images stay uint8 until the network's first layer; batches are read in one go, from RAM or from
the disk cache (equip.data._imagestore), and each process of a ddp job reads its own shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

from equip.data._imagestore import DiskImages
from equip.data.images import ImageSet


def build_augment(augment: DictConfig, image_size: int) -> v2.Transform | None:
    steps: list[v2.Transform] = []
    if augment.crop_scale:
        steps.append(v2.RandomResizedCrop(image_size, scale=(augment.crop_scale, 1.0)))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.vflip:
        steps.append(v2.RandomVerticalFlip())
    if augment.rotation or augment.translate:
        t = augment.translate
        # Photos are padded onto white: fill the uncovered corners white too, not black.
        steps.append(v2.RandomAffine(augment.rotation, translate=(t, t) if t else None, fill=255))
    if augment.policy != "none":  # on uint8 tensors, what a shear or shift uncovers left white
        policy = v2.TrivialAugmentWide if augment.policy == "trivialaugment" else v2.RandAugment
        steps.append(policy(fill=255))
    if augment.color_jitter:
        j = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if augment.erasing:  # occlusion: a white rectangle, like a missing part on the white ground
        steps.append(v2.RandomErasing(p=augment.erasing, value=255))
    return v2.Compose(steps) if steps else None


class TensorImages(Dataset):
    """uint8 images in RAM, or rows `index` of a DiskImages store. Batches are read in one go
    (__getitems__), not stacked per item."""

    def __init__(
        self,
        x: torch.Tensor | DiskImages,
        y: torch.Tensor,
        augment: v2.Transform | None = None,
        index: torch.Tensor | None = None,
    ):
        self.x, self.y, self.augment, self.index = x, y, augment, index

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.int64)
        x = self.x[index if self.index is None else self.index[index]]
        if self.augment is not None:  # per image: v2 on a batch would share one random draw
            x = torch.stack([self.augment(im) for im in x])
        return x, self.y[index]


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def build_mix(augment: DictConfig, num_classes: int) -> v2.Transform | None:
    """data.augment.mix: MixUp or CutMix over a training batch; labels become probabilities."""
    if augment.mix == "none":
        return None
    mix = v2.MixUp if augment.mix == "mixup" else v2.CutMix
    return mix(alpha=float(augment.mix_alpha), num_classes=num_classes)


class ImageDataModule(pl.LightningDataModule):
    def __init__(self, images: ImageSet, split: np.ndarray, data: DictConfig, seed: int):
        super().__init__()
        self.images, self.split, self.batch_size, self.seed = images, split, data.batch_size, seed
        self.num_workers = data.get("num_workers", 0)
        self.augment = build_augment(data.augment, data.image_size)
        self.mix = build_mix(data.augment, len(images.classes))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Mix training batches on their device; validation sees the images as they are."""
        if self.mix is None or self.trainer is None or not self.trainer.training:
            return batch
        x, y = batch
        # MixUp blends pixels: as float (the network's first layer takes 0-255 floats too)
        return self.mix(x.float() if isinstance(self.mix, v2.MixUp) else x, y)

    def subset(self, name: str, augment: v2.Transform | None = None) -> TensorImages:
        idx = torch.from_numpy(np.flatnonzero(self.split == name))
        x, y = self.images.images, self.images.labels[idx]
        if isinstance(x, DiskImages):  # streamed: rows are read per batch
            return TensorImages(x, y, augment, index=idx)
        return TensorImages(x[idx], y, augment)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        ds = self.subset(name, self.augment if name == "train" else None)
        gen = torch.Generator().manual_seed(self.seed)
        # num_workers=0 by default: in-memory data needs none (workers gained nothing on 2 cores);
        # streamed data on a GPU wants a few.
        kw = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return DataLoader(
                ds,
                batch_size=self.batch_size,
                shuffle=shuffle,
                generator=gen,
                collate_fn=_as_batch,
                **kw,
            )
        # Several processes: each reads its shard. Training pads to equal shards (every rank
        # must take the same number of steps); val does not, so its metrics, synced over ranks,
        # count each image exactly once.
        world, rank = trainer.world_size, trainer.global_rank
        if shuffle:
            sampler: Sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=self.seed)
        else:
            sampler = UnrepeatedDistributedSampler(ds, world, rank, shuffle=False)
        return DataLoader(
            ds, batch_size=self.batch_size, sampler=sampler, collate_fn=_as_batch, **kw
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
