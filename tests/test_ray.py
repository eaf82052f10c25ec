"""`hydra/launcher=ray` on a real 2-node Ray cluster on this machine, against a real MLflow server.

The cluster is Ray's own test cluster (ray.cluster_utils.Cluster): a head and a worker node, each a
separate raylet with 1 CPU. (Ray rewrites 127.0.0.1 in an address to the machine's own IP, so the
nodes listen there; everything stays on this machine.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from mlflow import MlflowClient  # noqa: E402

from equip.launchers.ray import _cluster as ray_cluster  # noqa: E402
from tests.conftest import (  # noqa: E402
    ROOT,
    TINY,
    MlflowServer,
    ctrl_c_a_training_sweep,
    gone_within,
    port_nobody_listens_on,
)

FAST = [*TINY, "tracking.log_model=false"]
MB = 2**20
EPOCHS = 20  # of each job in the lost-node sweep


@pytest.fixture(scope="module")
def cluster():
    """A Ray head node (1 CPU); tests add and remove worker nodes."""
    from ray.cluster_utils import Cluster

    # Workers start from the raylets' environment: make this checkout importable there too.
    # Token auth off for cluster and sweeps alike, whether or not ~/.ray/auth_token exists.
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_AUTH_MODE")}
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), saved["PYTHONPATH"]])
    )
    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 80 * MB,
            "include_dashboard": False,
            # a lost node is noticed in ~2 s instead of ~15 s
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    yield c
    c.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """A real `mlflow server` for the module (each test logs to its own experiment), started
    first so that it boots while the Ray cluster starts."""
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(server_process, cluster):
    """The server's URI, once it answers."""
    return server_process.wait(timeout_s=60)


@pytest.fixture
def worker(cluster):
    node = cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
    cluster.wait_for_nodes()
    yield node
    if node in cluster.worker_nodes:
        cluster.remove_node(node)


def ray_sweep(*args: str, cwd: Path, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=ray", *FAST, *args]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def parent_and_children(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment).experiment_id
    [parent] = client.search_runs([exp], "tags.`equip.sweep_key` != ''")
    children = client.search_runs(
        [exp],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return parent, children


@pytest.mark.slow
def test_smoke_sweep_runs_on_both_nodes_of_a_ray_cluster(tmp_path, server, cluster, worker):
    address = f"hydra.launcher.ray.init.address={cluster.address}"
    proc = ray_sweep(
        "sweep=smoke", address, f"tracking.uri={server}", "tracking.experiment=smoke", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(server)
    parent, children = parent_and_children(client, "smoke")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep smoke"
    assert "RayLauncher" in parent.data.tags["equip.launcher"]
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["equip.config_hash"] for c in children}) == 4
    for c in children:
        assert len(c.data.params) > 40 and c.data.params["data.image_size"] == "32"
        assert len(client.get_metric_history(c.info.run_id, "val_acc")) == 2
        assert 0 <= c.data.metrics["best_val_acc"] <= 1 and c.data.metrics["train_time_s"] > 0
    nodes = {c.data.tags["equip.ray_node_id"] for c in children}
    assert nodes == {cluster.head_node.node_id, worker.node_id}
    assert parent.data.metrics["jobs_finished"] == 4
    assert "rank" in proc.stdout and "filters=32-64 lr=0.003" in proc.stdout
    assert "done filters=" in proc.stderr  # the jobs' lines reach the driver's terminal


@pytest.mark.slow
def test_a_lost_node_fails_its_job_only_and_the_rerun_completes_it(
    tmp_path, server, cluster, worker
):
    # 3 jobs on 2 one-CPU nodes: one on each node, one queued until a node is free.
    args = (
        "model.filters=[4],[8],[4,8]",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.patience=0",
        f"hydra.launcher.ray.init.address={cluster.address}",
        f"tracking.uri={server}",
        "tracking.experiment=lost_node",
    )
    client = MlflowClient(server)
    proc = ray_sweep(*args, cwd=tmp_path, wait=False)
    try:
        lost_id = stop_a_job_on(client, worker.node_id, proc)
    except BaseException:
        proc.kill()
        raise
    cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: the machine is gone ...
    pid = int(client.get_run(lost_id).data.tags["equip.pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # ... and all that ran on it, the stopped job too
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 4, err[-3000:]  # a sweep that ended with a failed job
    parent, children = parent_and_children(client, "lost_node")
    lost = client.get_run(lost_id)
    # Ended by the launcher (FAILED: lost with its node) or, on this one-host cluster, first by
    # the next job's check for runs whose process is gone (KILLED): never left RUNNING.
    assert (lost.info.status, lost.data.tags["equip.error"].split(";")[0]) in {
        ("FAILED", "lost with its Ray node or worker process"),
        (
            "KILLED",
            f"its process {lost.data.tags['equip.pid']} on {socket.gethostname()} is gone "
            "(killed or crashed)",
        ),
    }
    others = [c for c in children if c.info.run_id != lost.info.run_id]
    assert len(others) == 2 and all(c.info.status == "FINISHED" for c in others)
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_failed"] == 1
    assert "lost with its Ray node or worker process" in err

    rerun = ray_sweep(*args, cwd=tmp_path)  # the same command: only the lost job runs again
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    parent, children = parent_and_children(client, "lost_node")
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 3 and len({c.data.tags["equip.config_hash"] for c in finished}) == 3
    assert {c.info.run_id for c in others} <= {c.info.run_id for c in finished}
    assert rerun.stderr.count("already FINISHED as run") == 2
    redone = next(
        c
        for c in finished
        if c.data.tags["equip.config_hash"] == lost.data.tags["equip.config_hash"]
    )
    if redone.info.run_id == lost.info.run_id:  # continued from its last checkpoint (resume)
        assert redone.data.tags["equip.resumed"] == "true"
    else:  # trained again from scratch, on a node still alive
        assert redone.data.tags["equip.ray_node_id"] != worker.node_id
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_skipped"] == 2


def stop_a_job_on(client: MlflowClient, node_id: str, sweep: subprocess.Popen) -> str:
    """The id of a job's run training on the node, stopped (SIGSTOP) at its first sighting with
    2 or more of its EPOCHS left. Stopped, it sends at most the one request already in flight,
    so it cannot finish before the node goes. Fails the test after 120 s."""
    deadline = time.time() + 120
    while time.time() < deadline:
        if sweep.poll() is not None:
            raise AssertionError(f"the sweep ended before a job ran there: {sweep.stderr.read()}")
        with contextlib.suppress(Exception):  # the experiment does not exist yet
            exp = client.get_experiment_by_name("lost_node").experiment_id
            on_node = client.search_runs(
                [exp], f"attributes.status = 'RUNNING' and tags.`equip.ray_node_id` = '{node_id}'"
            )
            for run in on_node:
                if stopped_with_epochs_left(
                    client, run.info.run_id, int(run.data.tags["equip.pid"])
                ):
                    return run.info.run_id
        time.sleep(0.2)
    raise AssertionError("no job was training on the worker node within 120 s")


def stopped_with_epochs_left(client: MlflowClient, run_id: str, pid: int) -> bool:
    """SIGSTOP the job; keep it stopped if it is RUNNING with 2 or more epochs to log."""
    os.kill(pid, signal.SIGSTOP)
    try:
        logged = len(client.get_metric_history(run_id, "val_acc"))
        if client.get_run(run_id).info.status == "RUNNING" and logged <= EPOCHS - 2:
            return True
    except Exception:
        pass
    os.kill(pid, signal.SIGCONT)
    return False


@pytest.mark.slow
def test_ctrl_c_on_a_ray_sweep_is_one_line_exit_130_and_leaves_nothing_running(tmp_path: Path):
    """On a local Ray instance: the terminal's Ctrl-C reaches the driver and Ray's own
    processes; the driver cancels the jobs (a KeyboardInterrupt in each), which end their runs
    KILLED, and says one line."""
    proc, err, client, started = ctrl_c_a_training_sweep(
        tmp_path,
        "hydra/launcher=ray",
        # a new local instance with a slot per job, never this module's test cluster (which
        # Ray would join without an address)
        "hydra.launcher.ray.init.address=local",
        "+hydra.launcher.ray.init.num_cpus=2",
        "model.filters=[4],[8]",
        jobs=2,
    )
    assert proc.returncode == 130, err[-3000:]
    ours = [line for line in err.splitlines() if not re.match(r"^(\S+ \S+ INFO |\d{4}-)", line)]
    assert ours == [
        "stopped by you: every job of the sweep is marked KILLED; run the same command again to "
        "resume"
    ], err[-3000:]
    runs = client.search_runs(["1"])
    assert len(runs) == 3 and all(r.info.status == "KILLED" for r in runs)
    assert not gone_within(started), "a Ray process outlived the sweep"


def test_a_local_store_with_a_remote_cluster_is_refused_before_anything(tmp_path: Path):
    proc = ray_sweep(
        "model.lr=0.001,0.003", "hydra.launcher.ray.init.address=203.0.113.7:6379", cwd=tmp_path
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("equip: error: tracking store sqlite:///")
    assert "203.0.113.7" in line and "use an mlflow server URI: mlflow server --host" in line
    assert "tracking.uri=http://" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


def test_an_unreachable_cluster_is_refused_in_one_line_within_30_s(tmp_path: Path):
    """Ray by default retries an address nobody answers for ~13 minutes (after rewriting
    127.0.0.1 to this machine's address); equip bounds it with Ray's own settings."""
    nobody = port_nobody_listens_on()
    started = time.monotonic()
    proc = ray_sweep(
        "model.lr=0.001,0.003",
        f"hydra.launcher.ray.init.address=127.0.0.1:{nobody}",
        f"tracking.uri=http://127.0.0.1:{nobody}",  # a server store: not refused as local
        cwd=tmp_path,
    )
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = (proc.stdout + proc.stderr).strip().splitlines()
    assert line.startswith("equip: error: cannot reach the Ray cluster at ")
    assert f"hydra.launcher.ray.init.address=127.0.0.1:{nobody}" in line
    assert took <= 30, f"refused after {took:.0f} s"
    assert not (tmp_path / "multirun").exists()


def test_which_stores_and_addresses_are_local():
    assert ray_cluster.is_local_store("sqlite:////tmp/mlflow.db")
    assert ray_cluster.is_local_store("file:///tmp/mlruns") and ray_cluster.is_local_store("mlruns")
    assert not ray_cluster.is_local_store("http://10.0.0.5:5000")
    assert ray_cluster.address_host(None) is None and ray_cluster.address_host("auto") is None
    assert ray_cluster.address_host("ray://10.0.0.7:10001") == "10.0.0.7"
    assert ray_cluster.address_host("10.0.0.7:6379") == "10.0.0.7"
    assert ray_cluster.is_local_host("127.0.0.1") and ray_cluster.is_local_host("localhost")
    assert not ray_cluster.is_local_host("203.0.113.7")
    assert ray_cluster.store_refusal("sqlite:////tmp/x.db", ["127.0.0.1"]) is None
    assert ray_cluster.store_refusal("http://10.0.0.5:5000", ["203.0.113.7"]) is None
    assert "mlflow server" in ray_cluster.store_refusal("sqlite:////tmp/x.db", ["203.0.113.7"])
