"""Training step time with OpenMP's threads spinning (ACTIVE) or sleeping (PASSIVE) between
parallel regions, on a quiet machine and with one core kept busy by another process.

    python bench/omp_wait.py [--steps 30]

Each cell is a fresh process (OMP_WAIT_POLICY is read once, when torch loads its OpenMP runtime),
all cells in one run, so the ratios compare like with like. equip sets PASSIVE unless the
environment says otherwise (equip/__init__.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys

CHILD = """
import sys, time, torch
from torch import nn
size, steps = int(sys.argv[1]), int(sys.argv[2])
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 12))
opt = torch.optim.Adam(net.parameters())
x, y = torch.randn(16, 3, size, size), torch.randint(0, 12, (16,))
def step():
    opt.zero_grad(); nn.functional.cross_entropy(net(x), y).backward(); opt.step()
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
print((time.perf_counter() - t) / steps * 1000)
"""


def busy() -> None:
    while True:
        pass


def step_ms(policy: str, size: int, steps: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(size), str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"{'image':>6} {'machine':>10} {'ACTIVE ms':>10} {'PASSIVE ms':>11} {'ratio':>6}")
    for loaded in (False, True):
        load = multiprocessing.Process(target=busy, daemon=True) if loaded else None
        if load:
            load.start()
        for size in (32, 128):
            active = step_ms("ACTIVE", size, args.steps)
            passive = step_ms("PASSIVE", size, args.steps)
            where = "1 busy" if loaded else "quiet"
            ratio = active / passive
            print(f"{size:>4}px {where:>10} {active:>10.1f} {passive:>11.1f} {ratio:>6.2f}")
        if load:
            load.terminate()


if __name__ == "__main__":
    main()
