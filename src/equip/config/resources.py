"""What the machine must have for a config: disk or RAM for the decoded images, GPUs and cores
for the trainer's processes, a folder where a key names one. Asks the machine (check_hardware:
torch), so only jobs about to train call these; config.checks holds the checks of the config
alone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from equip.errors import EquipError


def check_decoded_size(n_images: int, image_size: int, cache_dir: str | None, count: str) -> None:
    """Fail in a moment, not after hours of decoding, when the decoded images cannot fit where
    they go: the disk of data.cache_dir, or RAM without one. `count` is the key that sets N."""
    need = n_images * 3 * image_size * image_size
    if cache_dir:
        where = Path(cache_dir).expanduser().resolve()
        while not where.exists():  # not made yet: the disk it will be made on
            where = where.parent
        free, place = shutil.disk_usage(where).free, f"the disk of data.cache_dir={cache_dir}"
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        place = "RAM (data.cache_dir=null)"
    if need > free:
        raise EquipError(
            f"{count} with data.image_size={image_size}: {n_images} decoded images "
            f"need {need / 2**30:.1f} GiB but {place} has {free / 2**30:.1f} GiB "
            f"free. Lower data.image_size or {count.split('=')[0]}, or point "
            "data.cache_dir at a bigger disk."
        )


def processes_per_node(t: DictConfig) -> int:
    """Training processes this node runs for one job (1 unless devices > 1)."""
    return t.devices if isinstance(t.devices, int) else 1


def check_hardware(t: DictConfig) -> None:
    """What the machine can run: asks torch, so only jobs about to train call it."""
    import torch

    from equip.runtime import cpu_count

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if t.accelerator in ("gpu", "cuda") and gpus == 0:
        raise EquipError(
            f"trainer.accelerator={t.accelerator}: this machine has no usable "
            "GPU (CUDA). Use trainer.accelerator=auto or cpu."
        )
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise EquipError(
            "trainer.accelerator=mps: Apple's MPS is not available here. Use "
            "trainer.accelerator=auto or cpu."
        )
    on_cpu = t.accelerator == "cpu" or (
        t.accelerator == "auto" and gpus == 0 and not torch.backends.mps.is_available()
    )
    n = processes_per_node(t)
    if on_cpu:
        if n > cpu_count():
            raise EquipError(
                f"trainer.devices={n} CPU processes on {cpu_count()} core(s): use "
                f"trainer.devices={cpu_count()} or fewer."
            )
        if str(t.precision) in ("16-mixed", "16-true"):
            raise EquipError(
                f"trainer.precision={t.precision} needs a GPU; on CPU use "
                "trainer.precision=bf16-mixed or 32-true."
            )
    elif t.accelerator != "mps" and gpus and n > gpus:
        raise EquipError(
            f"trainer.devices={n} but this machine has {gpus} GPU(s): use "
            f"trainer.devices={gpus} or fewer, or trainer.num_nodes."
        )
    if n > 1 and t.strategy == "auto":
        raise EquipError(
            f"trainer.devices={n} needs trainer.strategy=ddp (one process per "
            "device, gradients all-reduced)."
        )


def check_data_root(root: Path) -> None:
    """data.root is a folder here (checked where the photos are read)."""
    if not root.is_dir():
        raise EquipError(
            f"data.root={root} does not exist or is not a folder. "
            "Point data.root at a folder with one sub-folder of images per class."
        )


def check_folder_path(value: str, key: str) -> None:
    """A folder `key` can hold or create: its nearest existing part is a writable folder, not a
    file. Nothing is created here (whole-sweep validation runs this for every point)."""
    path = Path(value).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise EquipError(
            f"{key}={value}: {existing} is a file, not a folder; choose another location (or null)."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EquipError(f"{key}={value}: {existing} is not writable; choose another location.")
