"""Training throughput of equip (Lightning) vs a minimal raw PyTorch loop, side by side.

Same model (the default Lab05 CNN), same in-memory uint8 images, same batch size, one process,
alternating rounds so that machine noise hits both alike. Also runs the raw loop once in a
child process with glibc's default allocator, to show what equip's start-up tuning buys.

    python bench/train_throughput.py [--images 768] [--rounds 3] [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch


def raw_epoch(net, x, y, batch_size: int, opt) -> float:
    """One epoch of the plainest loop we know; returns seconds."""
    net.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for idx in torch.randperm(len(y)).split(batch_size):
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x[idx]), y[idx]).backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--raw-only", action="store_true", help="(internal) raw loop, no tuning")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from equip.data.synthetic import make_synthetic
    from equip.model.cnn import build_net

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with initialize_config_dir(os.path.join(root, "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}"],
        )
    model_cfg = OmegaConf.to_container(cfg.model)
    per_class = -(-args.images // 12)
    images, labels = make_synthetic(per_class, args.image_size, seed=0)
    x = torch.from_numpy(images)[: args.images]
    y = torch.from_numpy(labels)[: args.images]

    def new_raw():
        torch.manual_seed(0)
        net = build_net(model_cfg, 12, args.image_size).to(memory_format=torch.channels_last)
        return net, torch.optim.Adam(net.parameters(), lr=model_cfg["lr"])

    if args.raw_only:  # child process: glibc defaults, torch's default thread count
        net, opt = new_raw()
        raw_epoch(net, x, y, args.batch_size, opt)  # warm-up
        secs = sum(raw_epoch(net, x, y, args.batch_size, opt) for _ in range(args.rounds))
        print(f"{len(y) * args.rounds / secs:.1f}")
        return

    from equip.runtime import apply_fast_path

    apply_fast_path()
    import numpy as np
    import pytorch_lightning as pl

    from equip.data.images import ImageSet
    from equip.data.loaders import ImageDataModule
    from equip.model.cnn import Classifier

    data = ImageSet(x, y, [str(i) for i in range(12)], [], [], "bench")
    dm = ImageDataModule(data, np.array(["train"] * len(y)), cfg.data, seed=0)

    def equip_epoch(module) -> float:
        trainer = pl.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accelerator="cpu",
        )
        t0 = time.perf_counter()
        trainer.fit(module, dm)
        return time.perf_counter() - t0

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)  # no per-fit banners
    module = Classifier(model_cfg, data.classes, args.image_size)
    net, opt = new_raw()
    equip_epoch(module), raw_epoch(net, x, y, args.batch_size, opt)  # warm-up both
    t_equip = t_raw = 0.0
    for r in range(args.rounds):
        te, tr = equip_epoch(module), raw_epoch(net, x, y, args.batch_size, opt)
        t_equip, t_raw = t_equip + te, t_raw + tr
        print(f"round {r + 1}: equip {len(y) / te:.1f} img/s, raw {len(y) / tr:.1f} img/s")
    equip_ips, raw_ips = len(y) * args.rounds / t_equip, len(y) * args.rounds / t_raw

    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--raw-only",
            f"--images={args.images}",
            f"--rounds={args.rounds}",
            f"--image-size={args.image_size}",
            f"--batch-size={args.batch_size}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    untuned = float(child.stdout.strip().splitlines()[-1])
    print(
        f"setup: {len(y)} images of {args.image_size} px, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print(f"raw loop, glibc default allocator (child process): {untuned:.1f} img/s")
    print(
        f"raw loop, tuned allocator + channels_last: {raw_ips:.1f} img/s "
        f"({raw_ips / untuned:.2f}x the untuned loop)"
    )
    print(
        f"equip/raw throughput ratio: {equip_ips / raw_ips:.2f} "
        f"(equip {equip_ips:.0f} img/s, raw {raw_ips:.0f} img/s)"
    )


if __name__ == "__main__":
    main()
