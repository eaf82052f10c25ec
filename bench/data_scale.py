"""Peak RSS and training img/s against data size, built-in data streamed from the disk cache.

For each size, one `train.py` child process (2 epochs of --train-batches batches and 4 val
batches, data streamed: data.ram_budget_mb=0) whose peak RSS comes from wait4(); img/s is the
training images of the second (warm) epoch over its epoch_time_s. Every size does the same
work, so only reading the data differs. The largest set is drawn once into the cache; the
smaller ones are copied out of it (image i of class c does not depend on per_class, so they are
the very files `data.per_class=n/12` would draw, with the same fingerprint). Also one in-RAM run
of the smallest size, today's path, for reference. --draw N1 N2 … instead measures drawing
N images into a fresh cache (peak RSS, img/s).

    python bench/data_scale.py [--sizes 2000 20000 60000] [--image-size 128] [--workdir DIR]
    python bench/data_scale.py --draw 1200 6000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cache_file(cache: Path, per_class: int, size: int) -> Path:
    from equip.data.images import PREPROCESS_VERSION

    return cache / f"synthetic-v{PREPROCESS_VERSION}-{size}px-seed0-{per_class}pc.npy"


def derive(cache: Path, big: int, small: int, size: int) -> None:
    """The per_class=small set, copied row by row out of the per_class=big one."""
    from equip.data import _imagestore

    target = cache_file(cache, small, size)
    if _imagestore.open_cached(target) is not None:
        return
    store, meta = _imagestore.open_cached(cache_file(cache, big, size))  # type: ignore[misc]
    rows = [c * big + i for c in range(12) for i in range(small)]
    shas = [meta["sha256"][r] for r in rows]
    images = (store[[r]][0].numpy() for r in rows)
    _imagestore.write(target, (len(rows), 3, size, size), images, lambda: {"sha256": shas})


def child(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run `cmd`; return (seconds, peak RSS in MiB, stderr tail)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, err[-500:]


def draw(per_class: int, size: int, cache: Path, work: Path) -> tuple[float, float]:
    """Draw the built-in data set into `cache` in a child process: (seconds, peak RSS MiB)."""
    code = (
        "from pathlib import Path; from equip.data.images import load_synthetic; "
        f"load_synthetic({per_class}, {size}, 0, Path({str(cache)!r}))"
    )
    secs, rss, _ = child([sys.executable, "-c", code], work)
    return secs, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 60000])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--train-batches", type=int, default=25)
    ap.add_argument("--draw", type=int, nargs="*", help="measure drawing these sizes instead")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/equip-data-scale"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    work = args.workdir.resolve()
    cache = work / "cache"
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    big = sizes[-1] // 12
    s = args.image_size

    from equip.data import _imagestore

    for n in args.draw or []:
        secs, rss = draw(n // 12, s, work / f"draw-{n}", work)
        print(
            f"drew {n // 12 * 12} images of {s} px into a fresh cache in {secs:.0f} s "
            f"({n / secs:.0f} img/s incl. start-up), peak RSS {rss:.0f} MiB",
            flush=True,
        )
    if args.draw:
        return
    if _imagestore.open_cached(cache_file(cache, big, s)) is None:
        secs, rss = draw(big, s, cache, work)
        print(
            f"drew {big * 12} images of {s} px into the cache in {secs:.0f} s "
            f"({big * 12 / secs:.0f} img/s), peak RSS {rss:.0f} MiB",
            flush=True,
        )
    for n in sizes[:-1]:
        derive(cache, big, n // 12, s)

    from mlflow import MlflowClient

    uri = f"sqlite:///{work}/mlflow.db"
    rows = []
    for n, budget in [(sizes[0], 1e9)] + [(n, 0) for n in sizes]:
        pc = n // 12
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            f"data.per_class={pc}",
            f"data.image_size={s}",
            f"data.cache_dir={cache}",
            f"data.ram_budget_mb={budget}",
            "data.val_fraction=0.05",
            "data.batch_size=64",
            "trainer.max_epochs=2",
            "trainer.patience=0",
            f"trainer.limit_train_batches={args.train_batches}",
            "trainer.limit_val_batches=4",
            "trainer.progress_bar=false",
            "tracking.log_model=false",
            f"tracking.uri={uri}",
        ]
        secs, rss, _ = child(cmd, work)
        run = MlflowClient(uri).search_runs(["1"], order_by=["attributes.start_time DESC"])[0]
        [_, warm] = MlflowClient(uri).get_metric_history(run.info.run_id, "epoch_time_s")
        ips = args.train_batches * 64 / warm.value
        decoded = pc * 12 * 3 * s * s / 2**20
        where = "RAM" if budget else "streamed"
        source = run.data.tags["equip.data_source"]
        rows.append((pc * 12, where, decoded, rss, ips, secs, source))
        print(
            f"{pc * 12:>6} images {where:>8} ({source}): decoded {decoded:7.0f} MiB, "
            f"peak RSS {rss:6.0f} MiB, {ips:6.1f} img/s, wall {secs:4.0f} s",
            flush=True,
        )
    streamed = [r for r in rows if r[1] == "streamed"]
    lo, hi = streamed[0], streamed[-1]
    growth = (hi[3] - lo[3]) / (hi[2] - lo[2])
    print(
        f"peak RSS growth {lo[0]} -> {hi[0]} images: {hi[3] - lo[3]:.0f} MiB = {growth:.1%} of "
        f"the {hi[2] - lo[2]:.0f} MiB more decoded data; img/s ratio {hi[4] / lo[4]:.2f}"
    )


if __name__ == "__main__":
    main()
