from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
GEAR = ROOT.parent / "shared" / "data" / "gear_images"
# Tiny and fast: 32 px images, 8 per class, 2 epochs.
TINY = [
    "data.image_size=32",
    "data.per_class=8",
    "data.val_fraction=0.25",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
]


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which would steer later tests and
    their subprocesses to an earlier test's store."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(name, None)
    yield
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(name, None)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite MLflow store in the test's temp dir, which is also the working dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path}/mlflow.db"


def make_cfg(*overrides: str, tiny: bool = True) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*(TINY if tiny else []), *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(port: int, folder: Path) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port with its store in `folder` (reused when the
    same folder is given again: a restarted server). Returns once it answers."""
    proc = launch_mlflow_server(port, folder)
    wait_for_server(proc, port, folder)
    return proc


def launch_mlflow_server(port: int, folder: Path) -> subprocess.Popen:
    """Start the server without waiting for it (it can boot while something else starts)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "server.log", "a")  # noqa: SIM115  # lives as long as the server
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers die with it
    )


def wait_for_server(proc: subprocess.Popen, port: int, folder: Path, timeout_s: float = 90) -> None:
    """Return once the server answers; stop it and raise with its log if it never does."""
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_process(proc)
                raise RuntimeError((folder / "server.log").read_text()[-3000:]) from None
            time.sleep(0.3)


def stop_process(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True and everything it started."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 with its own temp store; yields its URI."""
    port = free_port()
    proc = start_mlflow_server(port, tmp_path / "server")
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


# ---------------------------------------------------------------- shared helpers
def artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def write_pngs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    from equip.data.synthetic import make_synthetic

    images, _ = make_synthetic(1, 48, seed=5)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        files.append(folder / f"{i}.png")
        Image.fromarray(images[i].transpose(1, 2, 0)).save(files[-1])
    return files


def run_cli(*args: str, cwd: Path, tiny: bool = True) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess (TINY first: synthetic-data sizes)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *(TINY if tiny else []), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


FAST = [*TINY, "tracking.log_model=false"]


def sweep(*args: str, cwd: Path, env_uri: str | None = None, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if env_uri:
        env["MLFLOW_TRACKING_URI"] = env_uri
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, *args]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def parent_and_children(client: MlflowClient):
    [parent] = client.search_runs(["1"], "tags.`equip.sweep_key` != ''")
    children = client.search_runs(
        ["1"],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return parent, children
