"""What runs on a Ray worker: the warm-up every worker does first, and one job of the sweep."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from equip.runtime import stop_at_a_safe_point

NODE_TAG = "equip.ray_node_id"


def warm_up() -> str:
    """Import what every job needs; the sweep's jobs then run in this warm worker process
    (Ray reuses workers with the same runtime_env)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import equip.train.run  # noqa: F401  # torch, Lightning, MLflow

    return "warm"


def run_job_on_ray(
    hydra_context: HydraContext,
    sweep_config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    launch_dir: str,
    num_cpus: float,
    job_env: dict[str, str],
) -> JobReturn:
    import ray
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job

    from equip.runtime import cpu_count

    os.environ.update(job_env)  # the sweep's parent run and swept keys
    if Path(launch_dir).is_dir():  # one machine or a shared folder: relative paths as on the driver
        os.chdir(launch_dir)
    tags = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
    tags[NODE_TAG] = ray.get_runtime_context().get_node_id()
    tags["equip.ray_node_ip"] = ray.util.get_node_ip_address()
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps(tags)  # MLflow adds these to every new run
    with open_dict(sweep_config):
        # Jobs sharing a node share its cores: train with the reserved CPUs' worth of threads
        # (the same setting through which the joblib launcher shares them out).
        sweep_config.hydra.launcher.n_jobs = max(1, cpu_count() // max(1, int(num_cpus)))
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    stop_at_a_safe_point()  # a cancel (Ctrl-C) ends training after its current batch
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
