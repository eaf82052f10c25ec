"""The logged CNN's runtimes (ONNX Runtime beside torch: parity, runtime=auto|onnx|torch, models
logged before the ONNX export) and the quiet output of training and prediction."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from equip.errors import EquipError
from equip.serve.predict import load_predictor
from equip.serve.predict import main as predict_main
from tests.conftest import GEAR, ready_store, run_cli, write_pngs

# A network with every part the ONNX graph has to carry: batch norm, global pooling, mirror TTA.
TINY_GEAR_CNN = [
    "data.image_size=16",
    "trainer.max_epochs=1",
    "model.filters=[8,16]",
    "model.batch_norm=true",
    "model.head=gap",
    "model.tta=hflip",
    "tracking.log_onnx=true",
]
# What only MLflow prints, and no user asked for.
MLFLOW_NOISE = re.compile(r"Downloading artifacts|CloudPickle|INFO mlflow|onnxscript|onnx_ir")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """`python train.py` on a new store (as a user runs it): the run's output and model dir."""
    folder = tmp_path_factory.mktemp("inference")
    proc = run_cli(*TINY_GEAR_CNN, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = re.findall(r"MLflow: run ([0-9a-f]{32})", proc.stderr)[-1]
    [model_dir] = (folder / "mlartifacts").glob(f"*/{run_id}/artifacts/model")
    ready_store(folder / "unused")  # the template store, for tests that open their own
    return folder, proc, run_id, model_dir


def photo_frame(tmp_path: Path, source: str) -> pd.DataFrame:
    if source == "gear photos":
        files = sorted(p for p in GEAR.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        files = files[:: len(files) // 24][:24]  # every class, JPEG and PNG
    else:
        files = write_pngs(tmp_path, 3)
    return pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]})


def probabilities(frame: pd.DataFrame) -> np.ndarray:
    return frame[[c for c in frame.columns if c.startswith("p_")]].to_numpy()


@pytest.mark.parametrize(
    "source",
    [
        "synthetic",
        pytest.param(
            "gear photos",
            marks=pytest.mark.skipif(not GEAR.is_dir(), reason="no ../shared/data/gear_images"),
        ),
    ],
)
def test_onnx_and_torch_give_the_same_probabilities(trained, tmp_path: Path, source: str):
    *_, model_dir = trained
    frame = photo_frame(tmp_path, source)
    models = {
        rt: mlflow.pyfunc.load_model(str(model_dir), model_config={"runtime": rt})
        for rt in ("onnx", "torch", "auto")
    }
    assert {rt: m.unwrap_python_model().runner.name for rt, m in models.items()} == {
        "onnx": "onnx",
        "torch": "torch",
        "auto": "onnx",  # a model with model.onnx runs on ONNX Runtime unless told otherwise
    }
    onnx, torch_ = (models[rt].predict(frame) for rt in ("onnx", "torch"))
    assert np.abs(probabilities(onnx) - probabilities(torch_)).max() <= 1e-4
    assert onnx["class"].tolist() == torch_["class"].tolist()
    # The evaluation's own path (Classifier.forward: image and mirror in two calls) agrees too.
    import torch

    from equip.serve.pyfunc import decode_images, read_images

    classifier = models["torch"].unwrap_python_model().model
    with torch.inference_mode():
        x = torch.from_numpy(decode_images(read_images(frame, None), classifier.image_size))
        evaluated = classifier(x).softmax(1).numpy()
    assert np.abs(probabilities(onnx) - evaluated).max() <= 1e-4


def test_the_onnx_graph_and_its_spec_are_logged_with_the_model(trained):
    import onnx

    *_, model_dir = trained
    spec = mlflow.pyfunc.load_model(str(model_dir)).metadata.metadata["onnx"]
    assert spec["opset"] == 18 and spec["parity_max_abs_diff"] <= 1e-4
    assert spec["input"] == {"name": "image", "dtype": "uint8", "shape": ["batch", 3, 16, 16]}
    graph = onnx.load(str(model_dir / "artifacts" / "model.onnx")).graph
    [image] = graph.input
    dims = image.type.tensor_type.shape.dim
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 16, 16]
    assert (model_dir / "_cnn_model.py").is_file()  # models from code: nothing pickled
    assert not list(model_dir.rglob("python_model.pkl"))
    requirements = (model_dir / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "\nonnx==" in requirements


def test_a_model_logged_before_the_onnx_export_runs_on_torch(trained, tmp_path: Path):
    """Such a model: the pickled python_model, the checkpoint alone, no `runtime` config."""
    import equip
    from equip.serve.pyfunc import ImageClassifierModel

    *_, model_dir = trained
    old = tmp_path / "old-model"
    mlflow.pyfunc.save_model(
        old,
        python_model=ImageClassifierModel(),
        artifacts={"checkpoint": str(model_dir / "artifacts" / "best.ckpt")},
        model_config={"image_root": ""},
        code_paths=[str(Path(equip.__file__).parent)],
        pip_requirements=["mlflow"],
    )
    frame = photo_frame(tmp_path, "synthetic")
    expected = probabilities(mlflow.pyfunc.load_model(str(old)).predict(frame))
    for runtime in ("auto", "torch"):
        got = probabilities(load_predictor(str(old), runtime)(frame))
        assert np.abs(got - expected).max() == 0
    with pytest.raises(EquipError, match=r"^runtime=onnx: this model has no model.onnx .*"):
        load_predictor(str(old), "onnx")


def test_a_bad_runtime_is_one_line_naming_the_key_and_the_choices(
    trained, capsys: pytest.CaptureFixture[str]
):
    *_, model_dir = trained
    with pytest.raises(SystemExit) as exit_:
        predict_main([f"model={model_dir}", "images=.", "runtime=fast"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err == "equip: error: runtime=fast is not known; use one of: auto, onnx, torch.\n"
    with pytest.raises(EquipError, match="runtime=fast is not known"):
        mlflow.pyfunc.load_model(str(model_dir), model_config={"runtime": "fast"})


def test_training_and_prediction_print_only_equip_lines(trained, tmp_path: Path):
    folder, proc, run_id, _ = trained
    assert not MLFLOW_NOISE.search(proc.stdout + proc.stderr), proc.stderr[-3000:]
    write_pngs(tmp_path / "photos", 2)
    predicted = subprocess.run(
        [sys.executable, "-m", "equip.predict", f"model={run_id}", f"images={tmp_path / 'photos'}"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "2 image(s)" in predicted.stdout
    assert predicted.stderr == "", predicted.stderr[-3000:]


# ONNX Runtime sends its usage events about 30 s after its first session, through the proxy,
# unless one of these variables says it runs in CI (as `.ci/run` does: CI=true).
CI_MARKERS = {
    "CI",
    "BUILDKITE",
    "CIRCLECI",
    "CODEBUILD_BUILD_ID",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "JENKINS_URL",
    "TEAMCITY_VERSION",
    "TF_BUILD",
    "TRAVIS",
}
SESSION_THEN_WAIT = """
import sys, time
import numpy as np
from equip.serve.onnx_export import INPUT, onnx_session
onnx_session(sys.argv[1]).run(None, {INPUT: np.zeros((1, 3, 16, 16), np.uint8)})
print("ran", flush=True)
time.sleep(120)
"""


def test_onnx_runtime_sends_no_telemetry(trained):
    """Two processes run the logged graph through equip's session, each behind a proxy that
    records every connection: one as equip leaves it, one whose user turned ONNX Runtime's
    telemetry back on (ORT_DISABLE_TELEMETRY=0), which shows the wait sees an upload."""
    _, _, _, model_dir = trained
    graph = str(model_dir / "artifacts" / "model.onnx")
    setups = {"equip": {}, "user on": {"ORT_DISABLE_TELEMETRY": "0"}}
    proxies = {name: RecordingProxy() for name in setups}
    procs = {}
    try:
        for name, extra in setups.items():
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.lower().endswith("_proxy") and k not in CI_MARKERS
            }
            env |= {"HTTPS_PROXY": proxies[name].url, "https_proxy": proxies[name].url, **extra}
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", SESSION_THEN_WAIT, graph],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        for proc in procs.values():
            assert proc.stdout.readline() == "ran\n"
        deadline = time.time() + 90
        while not proxies["user on"].requests and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # the equip process is as old as the first upload, and a little more
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        for proxy in proxies.values():
            proxy.close()
    sent = proxies["user on"].requests
    assert sent, "ONNX Runtime sent nothing in 90 s when allowed to: the wait proves nothing"
    assert all(b"events.data.microsoft.com" in line for line in sent), sent
    assert proxies["equip"].requests == []


class RecordingProxy:
    """A listener that records the first line of each connection (a proxy's CONNECT)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._record, daemon=True).start()

    def _record(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            with conn:
                self.requests.append(conn.recv(1000).split(b"\r\n")[0])

    def close(self) -> None:
        self._listener.close()
