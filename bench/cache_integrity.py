"""What checking the decoded cache's pixels costs, against one warm training epoch.

The built-in data (data.per_class=100: 1,200 images, at --image-size 128 px) is drawn once into
--workdir's cache. Then, in alternating rounds so that machine noise hits both alike, the warm
cache is opened with the pixel checksum verified and without: read into RAM (the default: it
fits data.ram_budget_mb) and streamed (data.ram_budget_mb=0: the file hashed in chunks). The
hashes the standard library offers are timed on the same bytes, for the choice of CRC-32. Last,
one `train.py` child process trains the default CNN for 2 epochs on the same cache; its second
epoch_time_s is the warm epoch. The check runs once per process that opens the data, not once
per epoch, so its cost against one epoch is the worst case (a run of a single epoch).

    python bench/cache_integrity.py [--per-class 100] [--image-size 128] [--rounds 7]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def open_times(path: Path, budget_mb: float, rounds: int) -> tuple[float, float]:
    """Median seconds to open the cached set (verify off, verify on), alternating."""
    from equip.data import _imagestore

    def open_it(verify: bool) -> None:
        opened = _imagestore.open_cached(path, budget_mb, verify=verify)
        assert opened is not None, f"{path} did not open"
        images = opened[0]
        if isinstance(images, _imagestore.DiskImages):
            images.close()

    off, on = [], []
    for _ in range(rounds):
        off.append(timed(lambda: open_it(False)))
        on.append(timed(lambda: open_it(True)))
    return statistics.median(off), statistics.median(on)


def hash_rates(path: Path) -> dict[str, float]:
    """MB/s of each candidate over the cached pixels (one pass each, the best of 3)."""
    data = memoryview(path.read_bytes())
    candidates: dict[str, Callable[[], object]] = {
        "zlib.crc32": lambda: zlib.crc32(data),
        "zlib.adler32": lambda: zlib.adler32(data),
        "hashlib.sha1": lambda: hashlib.sha1(data).digest(),
        "hashlib.sha256": lambda: hashlib.sha256(data).digest(),
        "hashlib.blake2b": lambda: hashlib.blake2b(data).digest(),
    }
    return {
        name: len(data) / 1e6 / min(timed(fn) for _ in range(3)) for name, fn in candidates.items()
    }


def warm_epoch_s(work: Path, cache: Path, per_class: int, size: int) -> float:
    """epoch_time_s of the second epoch of `train.py` (default CNN) on the cached set."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{work}/mlflow.db"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"data.per_class={per_class}",
        f"data.image_size={size}",
        f"data.cache_dir={cache}",
        "trainer.max_epochs=2",
        "trainer.patience=0",
        "trainer.progress_bar=false",
        "tracking.log_model=false",
        f"tracking.uri={uri}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed:\n{proc.stderr[-3000:]}")
    client = MlflowClient(uri)
    run = client.search_runs(["1"], order_by=["attributes.start_time DESC"])[0]
    return client.get_metric_history(run.info.run_id, "epoch_time_s")[-1].value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/equip-cache-integrity"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from equip.data.images import load_synthetic, synthetic_cache_file

    work = args.workdir.resolve()
    cache = work / "cache"
    work.mkdir(parents=True, exist_ok=True)
    pc, size = args.per_class, args.image_size
    load_synthetic(pc, size, 0, cache)  # drawn once; later runs find it
    path = synthetic_cache_file(cache, pc, size, 0)
    mib = path.stat().st_size / 2**20
    print(f"{pc * 12} images of {size} px: {mib:.0f} MiB in {path}")

    for name, rate in hash_rates(path).items():
        print(f"  {name:16s} {rate:7.0f} MB/s")
    opened = {
        "in RAM": open_times(path, float("inf"), args.rounds),
        "streamed": open_times(path, 0, args.rounds),
    }
    epoch = warm_epoch_s(work, cache, pc, size)
    print(f"warm training epoch (default CNN, train.py): {epoch:.2f} s")
    for where, (off, on) in opened.items():
        cost = on - off
        print(
            f"open {where:8s}: {off * 1e3:7.1f} ms unverified, {on * 1e3:7.1f} ms verified "
            f"(ratio {on / off:.2f}); the check costs {cost * 1e3:.1f} ms = "
            f"{cost / epoch:.2%} of a warm epoch"
        )


if __name__ == "__main__":
    main()
