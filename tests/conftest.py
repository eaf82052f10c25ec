from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
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
