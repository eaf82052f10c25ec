"""`hydra/launcher=ray`: a sweep's jobs run as Ray tasks, on a Ray cluster or a local Ray instance.

    python train.py -m sweep=smoke hydra/launcher=ray                        # local Ray instance
    python train.py -m sweep=smoke hydra/launcher=ray hydra.launcher.ray.init.address=HEAD:6379 \
        tracking.uri=http://MLFLOW_HOST:5000

Our own launcher, not the hydra-ray-launcher plugin (1.2.2), because the plugin does not work with
our pins: it requires cloudpickle<3 while joblib 1.6 (scikit-learn, the joblib launcher) requires
cloudpickle>=3, so `pip check` fails; with Ray 2.60 it cannot join an existing cluster (it always
passes object_store_memory to ray.init, which Ray refuses when connecting); and it ray.get()s the
jobs one after the other, so one job lost with its node raises and the sweep loses the rest.

What this launcher adds for equip's sweeps:
- Ray workers do not inherit the driver's environment: each job gets the resolved MLflow store
  (MLFLOW_TRACKING_URI) through the sweep's runtime_env (plus `hydra.launcher.ray.runtime_env`),
  and the sweep's parent run (EQUIP_PARENT_RUN_ID) and swept keys (EQUIP_SWEPT_KEYS), which exist
  only once the sweep callback has run, with the task, set in the worker's environment first.
- Worker processes start before the parent run exists: a callback that runs before the sweep
  callback connects to Ray and has one worker per free slot import torch, Lightning and MLflow
  while the driver validates the grid. The runtime_env is new for each invocation, so a sweep
  never runs in a worker that imported an older version of the code.
- Each task reserves `hydra.launcher.ray.remote.num_cpus` (and `num_gpus`) and trains with that
  many threads. Tasks are spread over the nodes.
- Each child run is tagged with the Ray node it ran on (`equip.ray_node_id`, `equip.ray_node_ip`)
  through MLflow's MLFLOW_RUN_CONTEXT (tags added to every run the job starts).
- A job whose node (or worker process) is lost is not retried (`max_retries: 0`): its child run
  ends FAILED with the reason in `equip.error`, the other jobs go on, and the same command again
  reruns only what did not finish (the sweep's resume). With `max_retries=N` Ray reruns it instead,
  and the lost attempt still ends FAILED.
- A local store (sqlite or file) with a Ray cluster on other machines is refused before the sweep
  creates anything: those nodes could not write to it.

Every node needs equip importable (`pip install equip`, or a runtime_env with `pip`/`py_modules`)
and `data.root` readable at the same path; train.py and the configs need not be there (each job's
config is composed on the driver). Job logs go to the sweep folder at the driver's path on the
node that ran the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.experimental.callback import Callback
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from equip.errors import EquipError
from equip.launchers.ray._cluster import address_host, connect, plain, slots, store_refusal
from equip.launchers.ray._worker import run_job_on_ray, warm_up
from equip.launchers.runs import STOP_WAIT_S, completed, end_children, end_stopped_jobs, failed
from equip.sweep.context import FAILED_JOB_SCORE, PARENT_ENV, SWEPT_ENV, WORKER_ENV
from equip.terminal import fail, say
from equip.track import store
from equip.train.cli import say_stopped

log = logging.getLogger(__name__)
LOST_NODE = "lost with its Ray node or worker process"


_session: dict[str, Any] = {}  # this driver's Ray set-up, from the callback to the launcher


class RayPreflight(Callback):
    """Before the sweep callback creates the parent run: refuse a local store with a remote
    cluster, connect to Ray and warm its workers up (listed first by hydra/launcher/ray.yaml)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        start(config)


def start(config: DictConfig, warm_up_workers: bool = True) -> dict[str, Any]:
    """Check the store against the cluster, connect, and start the sweep's workers."""
    ray_cfg = config.hydra.launcher.ray
    try:
        uri = store.resolve_uri(config.tracking)
    except EquipError as e:
        fail(str(e), 2)
    host = address_host(OmegaConf.select(ray_cfg, "init.address"))
    why = store_refusal(uri, [host] if host is not None else [])
    if why:
        fail(why, 2)  # before connecting: a remote cluster may take long to answer
    ray = connect(ray_cfg.get("init") or {})
    hosts = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    why = store_refusal(uri, hosts)  # e.g. address=auto, with nodes on other machines
    if why:
        fail(why, 2)
    remote = {"num_cpus": 1, "max_retries": 0, **plain(ray_cfg.get("remote"))}
    env = plain(ray_cfg.get("runtime_env"))
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    env_vars.update(MLFLOW_TRACKING_URI=uri, EQUIP_RAY_SWEEP=uuid.uuid4().hex)
    runtime_env = {**env, "env_vars": env_vars}
    _session.update(uri=uri, remote=remote, runtime_env=runtime_env, hosts=hosts)
    if warm_up_workers:
        task = ray.remote(warm_up).options(**remote, runtime_env=runtime_env)
        _session["warm_up"] = [task.remote() for _ in range(slots(ray.cluster_resources(), remote))]
    return _session


# ---------------------------------------------------------------- the launcher, on the driver
def launch(
    config: DictConfig,
    hydra_context: HydraContext,
    task_function: TaskFunction,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
) -> list[JobReturn]:
    """Run one batch of a sweep's jobs as Ray tasks; every job's JobReturn, in order."""
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    session = _session or start(config, warm_up_workers=False)  # no callback: set up here
    import ray

    uri = store.connect(config.tracking)
    assert uri == session["uri"], f"{uri} != {session['uri']}"
    # The driver's `now` is cached; a worker would compute its own: fix the folder here.
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    remote = session["remote"]
    task = ray.remote(run_job_on_ray).options(**remote, runtime_env=session["runtime_env"])
    context, function, singletons = (
        ray.put(x) for x in (hydra_context, task_function, Singleton.get_state())
    )
    # The sweep's parent run and swept keys; a stopped job leaves the one line to this process.
    job_env = {k: os.environ[k] for k in (PARENT_ENV, SWEPT_ENV) if k in os.environ}
    job_env[WORKER_ENV] = "1"
    hosts = len(session["hosts"])
    log.info("Ray launcher: %d job(s) on %d node(s), in %s", len(job_overrides), hosts, sweep_dir)
    refs = []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"ray_{idx}"
            sweep_config.hydra.job.num = idx
            sweep_config.hydra.sweep.dir = str(sweep_dir)
        ref = task.remote(
            context,
            sweep_config,
            function,
            singletons,
            os.getcwd(),
            float(remote.get("num_cpus") or 0),
            job_env,
        )
        refs.append((idx, overrides, ref))
    return _collect(ray, refs, _continue_on_failure(config))


def _collect(ray: Any, refs: list[tuple[int, Sequence[str], Any]], go_on: bool) -> list[JobReturn]:
    """Every job's result, in order; a job lost with its node fails alone."""
    from ray.exceptions import RayError, RayTaskError

    results: list[JobReturn] = []
    try:
        for idx, overrides, ref in refs:
            try:
                results.append(ray.get(ref))
            except RayTaskError as e:  # the job itself raised past Hydra (SystemExit...)
                results.append(failed(overrides, e.as_instanceof_cause()))
            except RayError as e:  # its node or worker process was lost
                text = str(e).strip()
                first = re.split(r"(?<=\.)\s", text.splitlines()[0])[0] if text else ""
                say(
                    (f"job #{idx} {LOST_NODE}", "bold red"),
                    f" ({type(e).__name__}: {first}); run the same command again to rerun it",
                )
                lost = completed(overrides, FAILED_JOB_SCORE) if go_on else failed(overrides, e)
                results.append(lost)
    except BaseException as stopped:  # Ctrl-C: stop the jobs still queued or running
        _stop(ray, [ref for _, _, ref in refs])
        if isinstance(stopped, KeyboardInterrupt):
            say_stopped("every job of the sweep is marked KILLED")
            raise SystemExit(130) from None
        raise
    # Every task of the batch has returned or died, so a child still RUNNING lost its node:
    # with max_retries=0 the job itself, with retries an attempt that Ray ran again.
    fail_orphans(os.environ.get(PARENT_ENV))
    return results


def _stop(ray: Any, refs: list[Any]) -> None:
    """A KeyboardInterrupt in each job still running (Ray's cancel), STOP_WAIT_S for the jobs
    to end their runs KILLED, then the rest cancelled by force; a run still RUNNING is marked
    KILLED. (A Ctrl-C in the terminal also reaches a local Ray instance's own processes,
    which may be gone already.)"""
    with contextlib.suppress(Exception):
        for ref in refs:
            ray.cancel(ref)
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting
            ray.wait(refs, num_returns=len(refs), timeout=STOP_WAIT_S)
        for ref in refs:
            ray.cancel(ref, force=True)
    end_stopped_jobs()


def fail_orphans(parent_id: str | None) -> int:
    """After a batch whose every task has returned or died, a child still RUNNING was cut off
    with its node: end it FAILED with the reason. Returns how many."""
    return len(end_children(parent_id, "FAILED", f"{LOST_NODE}; rerun on resume"))


def _continue_on_failure(config: DictConfig | None) -> bool:
    if config is None:
        return True
    return bool(OmegaConf.select(config, "multirun.continue_on_failure", default=True))
