"""Baseline runs, the registration gate, the champion (a version tag), and using the
registered model."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from PIL import Image

from equip.champion import main as champion_main
from equip.data.synthetic import CLASSES
from equip.errors import EquipError
from equip.serve.predict import main as predict_main
from equip.serve.predict import model_location
from equip.track import champion
from equip.train.run import train
from tests.conftest import GEAR, free_port, make_cfg, write_pngs

# Data on which a CNN learns something in seconds; the same for every run of this module.
DATA = ["data.per_class=20", "data.image_size=40", "data.val_fraction=0.25"]
WEAK_BASELINE = [
    "model=baseline",
    "model.estimator=random_forest",
    "model.n_estimators=1",
    "model.features=[color_hist]",
]
STRONG_BASELINE = ["model=baseline", "model.features=[hog,color_hist,pixels]"]
GOOD_CNN = [
    "model.filters=[16,32]",
    "model.batch_norm=true",
    "model.head=gap",
    "trainer.max_epochs=8",
    "model.lr=0.003",
]
BAD_CNN = ["model.lr=0.0000001", "trainer.max_epochs=1"]
REGISTER = ["registry.enabled=true", "registry.name=gear"]


def run(*overrides: str) -> dict:
    return train(make_cfg(*DATA, *overrides), list(overrides))


def test_baseline_is_logged_like_a_cnn_run(store: str):
    result = run(*STRONG_BASELINE)
    client = MlflowClient(store)
    r = client.get_run(result["run_id"])
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "baseline=logreg features=hog-color_hist-pixels"
    for name in ("best_val_acc", "best_val_macro_f1", "best_val_loss", "val_acc", "val_macro_f1"):
        assert 0 <= r.data.metrics[name] <= 10, name
    assert r.data.metrics["best_val_acc"] > 0.3  # HOG + colour on drawn shapes: far above 1/12
    assert r.data.tags["equip.data_fingerprint"] == r.data.params["dataset.fingerprint"]
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "eval")}
    assert {"eval/per_class_metrics.csv", "eval/confusion_matrix.png"} <= arts
    assert result["model_uri"] == f"runs:/{r.info.run_id}/model"  # the run's own artifacts
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(r.info.run_id, "model")}


def decision(store: str, run_id: str) -> dict[str, str]:
    tags = MlflowClient(store).get_run(run_id).data.tags
    return {k.removeprefix("equip.registry."): v for k, v in tags.items() if "registry" in k}


def test_registration_needs_a_baseline_run_on_the_same_data(store: str):
    result = run(*BAD_CNN, *REGISTER)
    d = decision(store, result["run_id"])
    assert (
        d["decision"] == "not registered" and "no baseline run on data fingerprint" in d["reason"]
    )
    assert MlflowClient(store).search_registered_models() == []


def test_a_cnn_that_loses_to_the_baseline_is_not_registered(store: str):
    run(*STRONG_BASELINE)
    result = run(*BAD_CNN, *REGISTER)
    d = decision(store, result["run_id"])
    assert d["decision"] == "not registered" and "does not beat the baseline" in d["reason"]
    assert MlflowClient(store).search_registered_models() == []


def test_a_cnn_that_beats_the_baseline_is_registered_as_champion(store: str):
    base = run(*WEAK_BASELINE)
    result = run(*GOOD_CNN, *REGISTER)
    assert result["metrics"]["best_val_acc"] > base["metrics"]["best_val_acc"]
    d = decision(store, result["run_id"])
    assert d["decision"] == "registered" and d["version"] == "1"
    client = MlflowClient(store)
    mv = champion.current(client, "gear", "champion")
    assert str(mv.version) == "1" and mv.tags["equip.baseline_run_id"] == base["run_id"]
    assert mv.tags["equip.champion"] == "true" and float(mv.tags["equip.margin"]) > 0
    assert client.get_registered_model("gear").aliases == {}  # no alias: a workspace has none
    # Registered from the run's artifacts (runs:/), not from an MLflow 3 logged model.
    assert mv.run_id == result["run_id"] and mv.source.endswith(
        f"{result['run_id']}/artifacts/model"
    )


def test_the_champion_moves_only_to_a_better_model(store: str):
    no_gate = [*REGISTER, "registry.require_baseline=false"]
    weak = run(*BAD_CNN, *no_gate)
    strong = run(*GOOD_CNN, *no_gate)
    weak_again = run(*BAD_CNN, "seed=1", *no_gate)
    assert weak["registry"]["champion"] and strong["registry"]["champion"]
    assert weak_again["registry"]["registered"] and not weak_again["registry"]["champion"]
    client = MlflowClient(store)
    assert "the current champion (version 2) scores" in weak_again["registry"]["reason"]
    versions = client.search_model_versions("name='gear'")
    assert len(versions) == 3
    assert [str(v.version) for v in versions if "equip.champion" in v.tags] == ["2"]
    # equip.predict and equip.champion read models:/NAME@champion as that version, on any store.
    assert model_location("models:/gear@champion") == "models:/gear/2"
    with pytest.raises(EquipError, match="no version of registered model 'nope' is tagged"):
        model_location("models:/nope@champion")


def test_predict_cli_on_a_labelled_folder(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    result = run("trainer.max_epochs=1")  # any CNN: the command is under test, not the model
    from PIL import Image

    from equip.data.synthetic import make_synthetic

    images, labels = make_synthetic(2, 64, seed=9)
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / "photos" / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.transpose(1, 2, 0)).save(tmp_path / "photos" / CLASSES[y] / f"{i}.png")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "equip.predict",
            f"model={result['run_id']}",
            f"images={tmp_path / 'photos'}",
            "output=out.csv",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy: " in proc.stdout and "24 image(s)" in proc.stdout
    lines = Path("out.csv").read_text().splitlines()
    assert lines[0].startswith("file,true_class,class,probability,p_axes") and len(lines) == 25

    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:  # the command's main, in this process
        predict_main(["model=nope.ckpt", "images=."])
    assert bad.value.code == 2 and "model=nope.ckpt: no such checkpoint" in capsys.readouterr().err


class RunsCode:
    """What a malicious checkpoint carries: unpickling it would run a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    import torch

    from equip.serve.predict import main

    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, tmp_path / "evil.ckpt")
    write_pngs(tmp_path / "photos", 1)
    with pytest.raises(SystemExit) as stop:
        main([f"model={tmp_path / 'evil.ckpt'}", f"images={tmp_path / 'photos'}"])
    assert stop.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith(f"equip: error: {tmp_path / 'evil.ckpt'} is not a checkpoint that ")
    assert "GLOBAL posix.system" in line and "from a source you trust" in line
    assert "weights_only" not in line  # torch's own text advises turning the check off
    assert not marker.exists()


def test_a_chunked_body_over_the_limit_is_refused_as_it_streams_in():
    """No Content-Length: the body is counted as the app reads it, refused at the limit, and
    the rest read off the connection into nothing."""
    import asyncio

    from equip.serve.request_limit import RequestSizeLimit

    chunks = [{"type": "http.request", "body": b"x" * 1000, "more_body": True}] * 10
    chunks.append({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict] = []

    async def app(scope, receive, send):  # reads the whole body, as MLflow's handler does
        while (await receive())["more_body"]:
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(RequestSizeLimit(app, max_bytes=2500)(scope, receive, send))
    assert sent[0]["status"] == 413 and not chunks  # refused, and every chunk read
    assert "at most 0 MB" in json.loads(sent[1]["body"])["message"]


def post(port: int, body: dict) -> tuple[int, str]:
    return post_bytes(port, json.dumps(body).encode())


def post_bytes(port: int, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_posted_image(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run(*GOOD_CNN, *REGISTER, "registry.require_baseline=false")
    assert champion_main(["gear", "--tracking-uri", store]) == 0
    champion_uri = capsys.readouterr().out.strip()
    assert champion_uri == "models:/gear/1"  # what `mlflow models serve -m` is given
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            champion_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),  # noqa: SIM115
    )
    try:
        [png] = write_pngs(tmp_path / "post", 1)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(png.read_bytes()).decode()]],
            }
        }
        deadline = time.time() + 120
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"},
                )
                answer = json.load(urllib.request.urlopen(req, timeout=30))
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.time() < deadline, "server did not answer"
                time.sleep(0.5)
        [pred] = answer["predictions"]
        assert pred["class"] in CLASSES
        assert 0 < pred["probability"] <= 1

        # Refusals are one short line, the same whether a path exists or not, no traceback.
        bomb = tmp_path / "bomb.png"
        Image.new("1", (9000, 9000)).save(bomb)  # ~10 kB on disk, 81 MP decoded
        for value, expected in [
            ("/etc/passwd", "row 0: not base64-encoded image bytes (file paths are off"),
            ("/etc/no-such-file", "row 0: not base64-encoded image bytes (file paths are off"),
            ("%%%not-base64", "row 0: not base64-encoded image bytes"),
            (base64.b64encode(bomb.read_bytes()).decode(), "image 0 has 9000x9000 pixels"),
        ]:
            status, text = post(
                port, {"dataframe_split": {"columns": ["image"], "data": [[value]]}}
            )
            assert status == 400 and expected in text, text
            assert (
                "Traceback" not in text
                and "stack_trace" not in text
                and "/site-packages" not in text
            )
        # An oversized body is refused from its Content-Length, before MLflow reads it (it made
        # the process ~260 MB larger per 165 MB request; bench/serve_memory.py).
        served = psutil.Process(server.pid)
        rss = max(p.memory_info().rss for p in [served, *served.children(recursive=True)])
        huge = b'{"dataframe_split": {"columns": ["image"], "data": [["' + b"A" * (80 << 20)
        status, text = post_bytes(port, huge + b'"]]}}')
        assert status == 413 and "request body of 80 MB; a request holds at most 64 MB" in text
        grown = max(p.memory_info().rss for p in [served, *served.children(recursive=True)]) - rss
        assert grown < 32 << 20, f"the server grew by {grown >> 20} MB"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(not GEAR.is_dir(), reason="../shared/data/gear_images is not on this machine")
def test_real_photos_baseline_and_cnn_are_both_logged(store: str):
    data = ["data=folder", f"data.root={GEAR}", "data.image_size=32", "data.cache_dir=cache"]
    base = train(make_cfg(*data, "model=baseline", tiny=False), [])
    cnn = train(
        make_cfg(
            *data,
            "trainer.max_epochs=2",
            "trainer.progress_bar=false",
            "tracking.log_model=false",
            tiny=False,
        ),
        [],
    )
    client = MlflowClient(store)
    for r in (base, cnn):
        run_ = client.get_run(r["run_id"])
        assert run_.info.status == "FINISHED"
        assert run_.data.params["dataset.images"] == "1586"
        assert run_.data.metrics["best_val_acc"] > 1 / 12
    assert base["metrics"]["best_val_acc"] > 0.6  # the baseline is no strawman on real photos
