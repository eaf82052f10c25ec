"""Per-job overhead of the sweep launchers: basic (in-process), joblib (2 workers), Ray (2 nodes).

The same 8-job tiny sweep (32 px, 8 images per class, 2 epochs, no model logged) through each
launcher, each into a fresh sqlite store, timed from `python train.py -m` to its exit. The Ray
cluster (a head and a worker node on this machine, 1 CPU each, like joblib's 2 workers) is started
before the clock starts: a cluster outlives sweeps. Per-job overhead = wall time / jobs - the mean
`train_time_s` of the children: what a job costs beyond fitting (process start, imports, data,
MLflow logging, evaluation figures, scheduling).

    python bench/launcher_overhead.py [--only basic,joblib,ray]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = "0.001,0.0015,0.002,0.0025,0.003,0.0035,0.004,0.0045"  # 8 jobs
TINY = [
    "data.image_size=32",
    "data.per_class=8",
    "data.val_fraction=0.25",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "tracking.log_model=false",
]
GOAL_S = 1.5


def sweep(name: str, launcher_args: list[str]) -> dict[str, float]:
    from mlflow import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"model.lr={LRS}", *TINY, *launcher_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} sweep failed:\n{proc.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    children = client.search_runs(["1"], "tags.mlflow.parentRunId != ''")
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 8, f"{name}: {len(finished)} of 8 jobs finished"
    train = sum(c.data.metrics["train_time_s"] for c in finished) / len(finished)
    return {"wall": wall, "train": train, "overhead": wall / len(finished) - train}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="basic,joblib,ray", help="comma-separated launchers")
    which = ap.parse_args().only.split(",")
    results: dict[str, dict[str, float]] = {}
    if "basic" in which:
        results["basic"] = sweep("basic", [])
    if "joblib" in which:
        results["joblib (2 workers)"] = sweep(
            "joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
        )
    if "ray" in which:
        from ray.cluster_utils import Cluster

        # Ray's workers start from the raylets' environment: make this checkout importable there.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        )
        head = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        try:
            results["ray (2 nodes)"] = sweep(
                "ray", ["hydra/launcher=ray", f"hydra.launcher.ray.init.address={cluster.address}"]
            )
        finally:
            cluster.shutdown()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"8-job sweep ({', '.join(TINY[:5])}), {os.cpu_count()} CPU cores, load {load}")
    print(f"{'launcher':<20} {'wall s':>8} {'mean train_time_s':>18} {'overhead s/job':>15}")
    for name, r in results.items():
        print(f"{name:<20} {r['wall']:>8.1f} {r['train']:>18.2f} {r['overhead']:>15.2f}")
    if "basic" in results and "ray (2 nodes)" in results:
        ray_r = results["ray (2 nodes)"]
        ratio = ray_r["wall"] / results["basic"]["wall"]
        verdict = "met" if ray_r["overhead"] <= GOAL_S else "NOT met"
        print(f"Ray/basic wall-time ratio: {ratio:.2f}")
        print(f"goal Ray overhead <= {GOAL_S} s/job: {verdict} ({ray_r['overhead']:.2f} s/job)")


if __name__ == "__main__":
    main()
