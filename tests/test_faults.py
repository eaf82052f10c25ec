"""Faults and bad input, the way a user meets them: real train.py processes, a real sqlite store
and a real `mlflow server` that the test kills and restarts. Nothing is mocked."""

from __future__ import annotations

import importlib
import re
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from equip.train.cli import run_training
from equip.train.run import train
from tests.conftest import (
    freeze_when,
    make_cfg,
    parent_and_children,
    port_nobody_listens_on,
    ready_store,
    run_cli,
    start_mlflow_server,
    sweep,
    train_in_process,
    write_pngs,
)

PORT_NOBODY_LISTENS_ON = port_nobody_listens_on()

# (overrides, text the one line must contain). Every case must exit 2 with one line naming the
# key, before any run exists.
BAD_INPUTS = [
    (["model.lr=abc"], "model.lr"),
    (["model.lr=-1"], "model.lr"),
    (["model.weight_decay=-1"], "model.weight_decay"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.hidden=abc"], "model.hidden"),
    (["model.filters=[]"], "model.filters"),
    (["model.filters=[8,8,8,8,8,8,8,8,8]"], "model.filters"),
    (["model.kernel_sizes=99"], "model.kernel_sizes"),
    (["model.kernel_sizes=[3,3,3]"], "model.kernel_sizes"),
    (["model.pool=median"], "model.pool"),
    (["model=nosuch"], "model/nosuch"),
    (["model=baseline", "model.estimator=xgboost"], "model.estimator"),
    (["model=baseline", "model.features=[sift]"], "model.features"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=abc"], "data.batch_size"),
    (["data.image_size=100000"], "data.image_size"),
    (["data.image_size=0"], "data.image_size"),
    (["data.per_class=0"], "data.per_class"),
    (["data.val_fraction=0"], "data.val_fraction"),
    (["data.val_fraction=0.6", "data.test_fraction=0.5"], "data.test_fraction"),
    (["data.group_pattern='('"], "data.group_pattern"),
    (["data.augment.crop_scale=2"], "data.augment.crop_scale"),
    (["data.kind=xyz"], "data.kind"),
    (["data=folder"], "data.root"),
    (["data=folder", "data.root=/no/such/folder"], "data.root"),
    (["data=folder", "data.per_class=3"], "data.per_class"),
    (["trainer.max_epochs=1.5"], "trainer.max_epochs"),
    (["trainer.max_epochs=0"], "trainer.max_epochs"),
    (["trainer.patience=-3"], "trainer.patience"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches"),
    (["trainer.monitor=val_f1"], "trainer.monitor"),
    (["seed=abc"], "seed"),
    (["nosuchkey=1"], "nosuchkey"),
    (["+nosuchkey=1"], "nosuchkey"),
    (["+model.fliters=[8]"], "model.filters"),  # the close match is named
    (["model.tta=vflip"], "model.tta"),
    (["model.residual=maybe"], "model.residual"),
    (["registry.enabled=true", "tracking.log_model=false"], "registry.enabled"),
    (["tracking.uri=foo://bar"], "tracking.uri"),
    (["tracking.uri=sqlite:/relative.db"], "tracking.uri"),
    (["tracking.uri=sqlite:////proc/equip.db"], "tracking.uri"),
    (["tracking.artifact_root=a_file/artifacts"], "tracking.artifact_root"),
    (["data.cache_dir=a_file/cache"], "data.cache_dir"),  # was a NotADirectoryError traceback
    ([f"tracking.uri=http://user:hunter2@127.0.0.1:{PORT_NOBODY_LISTENS_ON}"], "unreachable"),
]


@pytest.mark.parametrize(
    ("args", "shown", "secret"),
    [
        (["data=folder", "data.root='photos[/y] AccountKey=abc'"], "AccountKey=***", "abc"),
        (["trainer.monitor='http://user:pass@host/[/x]'"], "http://***@host/[/x]", "pass"),
    ],
)
def test_an_error_is_one_plain_line_with_its_secrets_cut_out(
    tmp_path: Path, args: list[str], shown: str, secret: str
):
    """`[/y]` in a value is text, not Rich markup (it was a 44-line MarkupError)."""
    proc = train_in_process(args, tmp_path)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, lines
    [line] = lines
    assert line.startswith("equip: error: ") and shown in line, line
    assert secret not in line.replace("equip: error: ", ""), line


# A few of the table's cases as the real command in its own process: what `python train.py`
# prints and exits with is what the in-process runs of the whole table check.
IN_A_PROCESS = [0, 10, 23, len(BAD_INPUTS) - 1]


def check_one_line(args: list[str], key: str, proc: subprocess.CompletedProcess, cwd: Path):
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, (args, proc.returncode, lines[-5:])
    assert len(lines) == 1 and key in lines[0] and "equip: error:" in lines[0], (args, lines)
    assert "Traceback" not in lines[0] and "hunter2" not in lines[0]
    assert not list(cwd.glob("*.db")), (args, "a store was created")


@pytest.mark.parametrize(
    ("args", "key"),
    BAD_INPUTS,
    ids=[re.sub(r":\d+", ":PORT", " ".join(a))[:60] for a, _ in BAD_INPUTS],
)
def test_bad_inputs_get_one_line_naming_the_key_and_no_run(tmp_path: Path, args, key):
    (tmp_path / "a_file").write_text("not a folder")
    proc = train_in_process(["trainer.progress_bar=false", *args], tmp_path)
    check_one_line(args, key, proc, tmp_path)


def test_bad_inputs_get_one_line_from_the_real_command(tmp_path: Path):
    def case(i: int) -> None:
        args, key = BAD_INPUTS[i]
        cwd = tmp_path / str(i)
        cwd.mkdir()
        (cwd / "a_file").write_text("not a folder")
        check_one_line(args, key, run_cli(*args, cwd=cwd, tiny=False), cwd)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(case, IN_A_PROCESS))
    env_case = run_cli(cwd=tmp_path, tiny=False, env={"MLFLOW_TRACKING_URI": "sqlite://x.db"})
    check_one_line(["MLFLOW_TRACKING_URI=sqlite://x.db"], "MLFLOW_TRACKING_URI", env_case, tmp_path)


def test_a_loss_that_becomes_nan_fails_the_run_in_one_line(
    store: str, capsys: pytest.CaptureFixture
):
    """lr=1e308: the loss is NaN from the second step, and a few steps later Adam's update
    overflows (an opaque RuntimeError) unless the run stops first. train.py's own path, in
    process: run_training is all train.py adds to Hydra."""
    with pytest.raises(SystemExit) as stop:
        run_training(make_cfg("model.lr=1e308", "tracking.log_model=false"))
    err = capsys.readouterr().err  # MLflow's INFO lines as it creates the store, then ours
    assert stop.value.code == 1, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        "equip: error: loss became NaN at epoch 1 (step 2); lower model.lr "
        "(the learning rate was 1e+308)"
    ]
    [run] = MlflowClient(store).search_runs(["1"])
    assert run.info.status == "FAILED"
    assert run.data.tags["equip.error"].startswith("TrainingFailed: loss became NaN at epoch 1")
    assert "val_acc" not in run.data.metrics  # stopped within its first epoch


def test_an_svm_on_a_class_with_one_training_photo_fails_the_run_in_one_line(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """Its probabilities are calibrated on folds of the training photos, each with every class."""
    write_pngs(tmp_path / "photos" / "ropes", 6)
    for file in write_pngs(tmp_path / "photos" / "tents", 8)[:6]:  # not the ropes' pictures
        file.unlink()  # 2 tents left, val_fraction=0.5: one to train on
    cfg = make_cfg(
        "data=folder",
        f"data.root={tmp_path / 'photos'}",
        "data.image_size=32",
        "data.val_fraction=0.5",
        "model=baseline",
        "model.estimator=svm",
        "tracking.log_model=false",
        tiny=False,
    )
    with pytest.raises(SystemExit) as stop:
        run_training(cfg)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err  # bad input, as a bad key
    [line] = [line for line in err.splitlines() if "error" in line]
    assert line.startswith("equip: error: model.estimator=svm calibrates") and "'tents'" in line
    [run] = MlflowClient(store).search_runs(["1"])
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_sweep_stops_it_and_the_rerun_completes_it(
    tmp_path: Path,
):
    server = start_mlflow_server(tmp_path / "server")
    client = MlflowClient(server.uri)
    args = (
        "model.filters=[4],[8],[4,8]",
        "trainer.max_epochs=4",
        "data.per_class=24",
        "tracking.outage_s=3",
    )
    proc = sweep(*args, cwd=tmp_path, env_uri=server.uri, wait=False)

    def first_job_done_and_more_to_log() -> list | None:
        """With the sweep stopped, at most one of its requests is still in flight. With only one
        job FINISHED, or a job not yet created, a job still needs the server after that one."""
        children = client.search_runs(["1"], "tags.mlflow.parentRunId != ''")
        finished = [c for c in children if c.info.status == "FINISHED"]
        if len(finished) == 1 or (finished and len(children) < 3):
            return finished
        return None

    finished = freeze_when(proc, first_job_done_and_more_to_log, "first finished job")
    server.stop()  # the store goes away while the sweep has jobs left
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "The sweep stops here" in err and "Traceback" not in err

    server = start_mlflow_server(tmp_path / "server", server.port)  # the same store comes back
    try:
        rerun = sweep(*args, cwd=tmp_path, env_uri=server.uri)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        parent, children = parent_and_children(client)
        done = [c for c in children if c.info.status == "FINISHED"]
        assert len({c.data.tags["equip.config_hash"] for c in done}) == 3
        assert finished[0].info.run_id in {c.info.run_id for c in done}  # not trained again
        assert all(c.info.status != "RUNNING" for c in children)
        assert parent.info.status == "FINISHED"
    finally:
        server.stop()


# Under notes.*, the one free-form place: the schema refuses unknown keys anywhere else, so a
# secret can no longer reach model.* (and the checkpoint's hyper-parameters) at all.
SECRETS = {
    "+notes.conn": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=AcctKEY0secret==;",
    "+notes.api_key": "ApiKEY1secret",
    "+notes.bearer": "BearerTOKEN2secret",
    "+notes.blob_url": "https://a.blob.core.windows.net/c?sv=2024&sig=SasSIG3secret",
    "+notes.token_note": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.BEARER4secret",
}


def test_no_secret_reaches_the_store_the_artifacts_or_the_checkpoint(tmp_path: Path):
    server = start_mlflow_server(tmp_path / "server")
    try:
        overrides = [f"{k}='{v}'" for k, v in SECRETS.items()]
        cfg = make_cfg(
            *overrides,
            "trainer.max_epochs=1",
            f"tracking.uri=http://equip:PassWORD5secret@127.0.0.1:{server.port}",
        )
        result = train(cfg, overrides)
        assert MlflowClient(server.uri).get_run(result["run_id"]).info.status == "FINISHED"
    finally:
        server.stop()
    files = [p for p in (tmp_path / "server").rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.suffix == ".db" for p in files)
    leaked = {
        (p.name, s)
        for p in files
        for s in (
            "AcctKEY0secret",
            "ApiKEY1secret",
            "BearerTOKEN2secret",
            "SasSIG3secret",
            "BEARER4secret",
            "PassWORD5secret",
        )
        if s.encode() in p.read_bytes()
    }
    assert leaked == set()


@pytest.mark.parametrize(
    ("module", "args", "key"),
    [
        (
            "equip.serve.predict",
            ["model=models:/gear@champion", "images=.", "tracking_uri={uri}"],
            "tracking_uri",
        ),
        (
            "equip.serve.app.command",
            ["model=models:/gear@champion", "tracking_uri={uri}"],
            "tracking_uri",
        ),
        ("equip.leaderboard", ["latest", "--tracking-uri", "{uri}"], "--tracking-uri"),
        ("equip.champion", ["gear", "--tracking-uri", "{uri}"], "--tracking-uri"),
    ],
    ids=["predict", "app", "leaderboard", "champion"],
)
def test_a_store_a_command_cannot_read_is_one_line_naming_its_option(
    module: str,
    args: list[str],
    key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    """predict, the app, the leaderboard and champion: as train.py refuses its tracking.uri,
    in seconds, before MLflow makes an empty store or retries a dead server for minutes."""
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(module).main
    nobody = f"http://127.0.0.1:{PORT_NOBODY_LISTENS_ON}"
    for uri, says in (
        ("foo://bar", f"{key}=foo://bar: unknown scheme 'foo'; use sqlite:///PATH.db"),
        (f"sqlite:///{tmp_path}/none.db", f"no MLflow store at sqlite:///{tmp_path}/none.db: "),
        (nobody, f"the MLflow server {nobody} is unreachable ({key}): start it or give another"),
    ):
        with pytest.raises(SystemExit) as refused:
            main([a.format(uri=uri) for a in args])
        err = capsys.readouterr().err.strip()
        assert refused.value.code == 2 and err.startswith(f"equip: error: {says}"), err
        assert len(err.splitlines()) == 1 and not (tmp_path / "none.db").exists()


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("outptu=x.csv", "outptu: Key 'outptu' not in 'PredictOptions'; options: model, images, "),
        ("show=abc", "show: Value 'abc' of type 'str' could not be converted to Integer"),
        ("output=no/such/folder/p.csv", "output=no/such/folder/p.csv: no folder "),
    ],
)
def test_a_wrong_predict_option_is_one_line_before_any_work(
    option: str,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    from equip.serve.predict import main as predict

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        predict(["model=models:/gear@champion", "images=.", option])
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and err.startswith(f"equip: error: {says}"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "mlflow.db").exists()


def test_predict_on_a_run_without_a_model_says_why_it_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from equip.serve.predict import main as predict

    monkeypatch.chdir(tmp_path)
    uri = ready_store(tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment("equip")
    failed = client.create_run(experiment).info.run_id
    client.set_tag(failed, "equip.error", "ValueError: the loss is nan")
    client.set_terminated(failed, "FAILED")
    unlogged = client.create_run(experiment).info.run_id
    client.log_param(unlogged, "tracking.log_model", "false")
    client.set_terminated(unlogged, "FINISHED")
    write_pngs(tmp_path / "photos", 1)
    capsys.readouterr()  # MLflow's notes on making the store: not the command's
    for run_id, says in (
        (failed, "(the run ended FAILED: ValueError: the loss is nan; a run logs its model once"),
        (unlogged, "(the run was trained with tracking.log_model=false: it logged no model)"),
    ):
        with pytest.raises(SystemExit) as refused:
            predict([f"model={run_id}", "images=photos", f"tracking_uri={uri}"])
        err = capsys.readouterr().err.strip()
        assert refused.value.code == 2 and err.startswith(f"equip: error: model={run_id}: ")
        assert says in err and len(err.splitlines()) == 1, err
