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

import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.experimental.callback import Callback
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from equip.errors import EquipError
from equip.sweep.context import FAILED_JOB_SCORE, PARENT_ENV, SWEPT_ENV
from equip.track import schema, store

log = logging.getLogger(__name__)
console = Console(stderr=True, soft_wrap=True)
NODE_TAG = "equip.ray_node_id"
LOST_NODE = "lost with its Ray node or worker process"


# ---------------------------------------------------------------- one store for every node
def is_local_store(uri: str) -> bool:
    """A store only this machine can write to: sqlite, a file store, a plain path."""
    scheme = urlsplit(uri).scheme.lower()
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # "C:\..." is a path too


def is_local_host(host: str) -> bool:
    """True when `host` is this machine (loopback, its name, or one of its addresses)."""
    if host in ("", "localhost") or host.startswith("127.") or host == "::1":
        return True
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return False
    if ip.startswith("127."):
        return True
    with socket.socket() as s:  # an address of this machine is the only one we can bind to
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def address_host(address: str | None) -> str | None:
    """The host of a Ray address (`HOST:PORT`, `ray://HOST:PORT`); None for a local instance."""
    if not address or address in ("local", "auto"):
        return None
    if "://" not in address:
        address = "ray://" + address
    return urlsplit(address).hostname or ""


def store_refusal(uri: str, hosts: Sequence[str]) -> str | None:
    """Why the jobs on `hosts` could not log to `uri`, or None when they can."""
    remote = [h for h in hosts if not is_local_host(h)]
    if not remote or not uri or not is_local_store(uri):
        return None
    return (
        f"tracking store {uri} is on this machine only, but the Ray cluster has nodes on "
        f"{', '.join(sorted(set(remote)))}: use an mlflow server URI: mlflow server --host "
        "0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db --artifacts-destination "
        "./mlartifacts, and tracking.uri=http://THIS_HOST:5000"
    )


def _refuse(why: str) -> None:
    console.print(f"[bold red]equip: error:[/] {why}", highlight=False)
    raise SystemExit(2)


_session: dict[str, Any] = {}  # this driver's Ray set-up, from the callback to the launcher


class RayPreflight(Callback):
    """Before the sweep callback creates the parent run: refuse a local store with a remote
    cluster, connect to Ray and warm its workers up (listed first by hydra/launcher/ray.yaml)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        start(config)


def start(config: DictConfig, warm_up: bool = True) -> dict[str, Any]:
    """Check the store against the cluster, connect, and start the sweep's workers."""
    ray_cfg = config.hydra.launcher.ray
    try:
        uri = store.resolve_uri(config.tracking)
    except EquipError as e:
        _refuse(str(e))
    host = address_host(OmegaConf.select(ray_cfg, "init.address"))
    why = store_refusal(uri, [host] if host is not None else [])
    if why:
        _refuse(why)  # before connecting: a remote cluster may take long to answer
    ray = _connect(ray_cfg.get("init") or {})
    hosts = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    why = store_refusal(uri, hosts)  # e.g. address=auto, with nodes on other machines
    if why:
        _refuse(why)
    remote = {"num_cpus": 1, "max_retries": 0, **_plain(ray_cfg.get("remote"))}
    env = _plain(ray_cfg.get("runtime_env"))
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    env_vars.update(MLFLOW_TRACKING_URI=uri, EQUIP_RAY_SWEEP=uuid.uuid4().hex)
    runtime_env = {**env, "env_vars": env_vars}
    _session.update(uri=uri, remote=remote, runtime_env=runtime_env, hosts=hosts)
    if warm_up:
        slots = _slots(ray.cluster_resources(), remote)
        task = ray.remote(_warm_up).options(**remote, runtime_env=runtime_env)
        _session["warm_up"] = [task.remote() for _ in range(slots)]
    return _session


def _slots(resources: dict[str, float], remote: dict[str, Any]) -> int:
    """How many jobs the cluster runs at once."""
    need = {"CPU": remote.get("num_cpus") or 0, "GPU": remote.get("num_gpus") or 0}
    fits = [int(resources.get(r, 0) // n) for r, n in need.items() if n > 0]
    return max(1, min([*fits, 64]))


def _warm_up() -> str:
    """Import what every job needs; the sweep's jobs then run in this warm worker process
    (Ray reuses workers with the same runtime_env)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import equip.train.run  # noqa: F401  # torch, Lightning, MLflow

    return "warm"


# ---------------------------------------------------------------- the job, on a Ray worker
def _run_job_on_ray(
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
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


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
    session = _session or start(config, warm_up=False)  # no callback: set up here
    import ray

    uri = store.connect(config.tracking)
    assert uri == session["uri"], f"{uri} != {session['uri']}"
    # The driver's `now` is cached; a worker would compute its own: fix the folder here.
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    remote = session["remote"]
    task = ray.remote(_run_job_on_ray).options(**remote, runtime_env=session["runtime_env"])
    context, function, singletons = (
        ray.put(x) for x in (hydra_context, task_function, Singleton.get_state())
    )
    job_env = {k: os.environ[k] for k in (PARENT_ENV, SWEPT_ENV) if k in os.environ}
    log.info(
        "Ray launcher: %d job(s) on %d node(s), sweep output dir: %s",
        len(job_overrides),
        len(session["hosts"]),
        sweep_dir,
    )
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
                results.append(_failed(overrides, e.as_instanceof_cause()))
            except RayError as e:  # its node or worker process was lost
                text = str(e).strip()
                first = re.split(r"(?<=\.)\s", text.splitlines()[0])[0] if text else ""
                console.print(
                    f"[bold red]job #{idx} {LOST_NODE}[/] ({type(e).__name__}: "
                    f"{first}); run the same command again to rerun it",
                    highlight=False,
                )
                lost = _completed(overrides, FAILED_JOB_SCORE) if go_on else _failed(overrides, e)
                results.append(lost)
    except BaseException:  # Ctrl-C: stop the jobs still queued or running
        for _, _, ref in refs:
            ray.cancel(ref, force=True)
        raise
    # Every task of the batch has returned or died, so a child still RUNNING lost its node:
    # with max_retries=0 the job itself, with retries an attempt that Ray ran again.
    fail_orphans(os.environ.get(PARENT_ENV))
    return results


def fail_orphans(parent_id: str | None) -> int:
    """After a batch whose every task has returned or died, a child still RUNNING was cut off
    with its node: end it FAILED with the reason. Returns how many."""
    if not parent_id:
        return 0
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    orphans = client.search_runs([exp], schema.children_of(parent_id, "RUNNING"))
    for run in orphans:
        client.set_tag(run.info.run_id, schema.ERROR, f"{LOST_NODE}; rerun on resume")
        client.set_terminated(run.info.run_id, "FAILED")
    return len(orphans)


def _connect(init: DictConfig | dict) -> Any:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each job's own "done ..." line, no "[repeated]"
    import ray

    if not ray.is_initialized():
        kwargs = {k: v for k, v in _plain(init).items() if v is not None}
        if address_host(kwargs.get("address")) is None and kwargs.get("address") != "auto":
            kwargs.setdefault("include_dashboard", False)  # a local instance for this sweep
        kwargs.setdefault("log_to_driver", True)
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = kwargs.get("address") or "a local instance"
            console.print(
                f"[bold red]equip: error:[/] cannot start or reach Ray ({where}): {e}",
                highlight=False,
            )
            raise SystemExit(2) from None
    return ray


def _plain(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def _continue_on_failure(config: DictConfig | None) -> bool:
    if config is None:
        return True
    return bool(OmegaConf.select(config, "multirun.continue_on_failure", default=True))


def _completed(overrides: Sequence[str], value: Any) -> JobReturn:
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)


def _failed(overrides: Sequence[str], error: BaseException) -> JobReturn:
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)
