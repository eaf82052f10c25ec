from __future__ import annotations

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
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


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


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 with its own temp store; yields its URI."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    log = open(store / "server.log", "w")  # noqa: SIM115  # lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError((store / "server.log").read_text()[-3000:]) from None
            time.sleep(0.3)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


# ---------------------------------------------------------------- shared helpers
def artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def write_pngs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    from equip.synthetic import make_synthetic

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
        cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


FAST = [*TINY, "tracking.log_model=false"]


def sweep(*args: str, cwd: Path, env_uri: str | None = None, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if env_uri:
        env["MLFLOW_TRACKING_URI"] = env_uri
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def parent_and_children(client: MlflowClient):
    [parent] = client.search_runs(["1"], "tags.`equip.sweep_key` != ''")
    children = client.search_runs(
        ["1"], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )  # fmt: skip
    return parent, children
