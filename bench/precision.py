"""Training speed of trainer.precision=32-true vs bf16-mixed (what `auto` picks on AMX CPUs).

The same network (experiment=gear's model), the same in-memory uint8 images and batch size,
one process, alternating rounds so that machine noise hits both alike; each round is one
Lightning epoch through equip's own module and data module.

    python bench/precision.py [--images 512] [--rounds 3] [--image-size 128]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128)
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with initialize_config_dir(os.path.join(root, "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=gear", "data.root=unused", f"data.image_size={args.image_size}"],
        )

    from equip.runtime import apply_fast_path, resolve_precision

    apply_fast_path()
    import numpy as np
    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf

    from equip.data.images import ImageSet
    from equip.data.loaders import ImageDataModule
    from equip.data.synthetic import make_synthetic
    from equip.model.cnn import Classifier

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)  # no per-fit banners
    images, labels = make_synthetic(-(-args.images // 12), args.image_size, seed=0)
    x, y = torch.from_numpy(images)[: args.images], torch.from_numpy(labels)[: args.images]
    data = ImageSet(x, y, [str(i) for i in range(12)], [], [], "bench")
    dm = ImageDataModule(data, np.array(["train"] * len(y)), cfg.data, seed=0)
    model_cfg = OmegaConf.to_container(cfg.model)
    modules = {
        p: Classifier(model_cfg, data.classes, args.image_size) for p in ("32-true", "bf16-mixed")
    }

    def epoch(precision: str) -> float:
        trainer = pl.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accelerator="cpu",
            precision=precision,
        )
        t0 = time.perf_counter()
        trainer.fit(modules[precision], dm)
        return time.perf_counter() - t0

    for p in modules:  # warm-up
        epoch(p)
    secs = dict.fromkeys(modules, 0.0)
    for r in range(args.rounds):
        for p in modules:
            secs[p] += epoch(p)
        print(
            f"round {r + 1}: "
            + ", ".join(f"{p} {len(y) * (r + 1) / s:.1f} img/s" for p, s in secs.items())
        )
    ips = {p: len(y) * args.rounds / s for p, s in secs.items()}
    print(
        f"setup: {len(y)} images of {args.image_size} px, batch {cfg.data.batch_size}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds; "
        f"trainer.precision=auto picks {resolve_precision('auto', 'cpu')} here"
    )
    print(
        f"bf16-mixed/32-true training throughput: {ips['bf16-mixed'] / ips['32-true']:.2f}x "
        f"({ips['bf16-mixed']:.0f} vs {ips['32-true']:.0f} img/s)"
    )


if __name__ == "__main__":
    main()
