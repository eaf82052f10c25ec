"""No secret on a terminal or in a file: real `python train.py` runs and sweeps with secrets in
known keys; their output, every file they leave and the MLflow store are searched for them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from equip.track.hydra_output import RedactHydraFiles, redact_yaml_file
from equip.track.redaction import SecretFilter, redact_text, strip_secrets
from tests.conftest import parent_and_children, run_cli, sweep, train_in_process

PASSWORD = "Zq9xLm42vW"  # no secret-looking word in it: only the user:password@ form gives it away
SIGNATURE = "AbC%2Bsg7Ue3Ytq"
SAS_URL = f"https://acct.blob.core.windows.net/c?sv=2024-01-01&sr=c&sig={SIGNATURE}&se=2030"
TOKEN = "tk7Jh3Wq0pR"
FOLDER_FAST = [
    "data.image_size=32",
    "data.batch_size=16",
    "trainer=debug",
    "trainer.progress_bar=false",
]
SECRETS = (PASSWORD, SIGNATURE, TOKEN)


def leaks(texts: list[str], folder: Path) -> list[str]:
    """Where any secret shows: in one of the texts or in any file under `folder`."""
    found = [f"output {i}" for i, t in enumerate(texts) if any(s in t for s in SECRETS)]
    for path in folder.rglob("*"):
        if path.is_file() and any(s.encode() in path.read_bytes() for s in SECRETS):
            found.append(str(path.relative_to(folder)))
    return found


def write_photos(root: Path, per_class: int) -> None:
    """Two class folders of distinct PNGs: drawings of the built-in set's first two classes."""
    from PIL import Image

    from equip.data.synthetic import make_synthetic

    drawn, _ = make_synthetic(per_class, 48, seed=5)  # ordered class by class
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(drawn[c * per_class + i].transpose(1, 2, 0)).save(
                root / name / f"{i}.png"
            )


def hydra_files(folder: Path) -> list[Path]:
    return sorted([*folder.rglob(".hydra/*.yaml"), *folder.rglob("multirun.yaml")])


# ---------------------------------------------------------------- the patterns themselves
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"data.root=http:/bob:{PASSWORD}@host/x", "data.root=http:/***@host/x"),  # // collapsed
        (f"http://bob:{PASSWORD}@host/x", "http://***@host/x"),
        (f"s3:bob:{PASSWORD}@bucket", "***@bucket"),  # scheme-less: all before @ goes
        (f"reach bob:{PASSWORD}@db.local now", "reach ***@db.local now"),
        ("models:/equip-gear@champion", "models:/equip-gear@champion"),  # an alias, no password
        ("repo/img:1.0@sha256:0a1b", "repo/img:1.0@sha256:0a1b"),  # an image digest
    ],
)
def test_userinfo_is_cut_out_in_any_uri_form(text: str, shown: str):
    assert strip_secrets(text) == shown


def test_a_launcher_line_keeps_its_overrides_but_not_their_secrets():
    line = (
        f"\t#0 : model.lr=0.1 +model.api_key={TOKEN} tracking.bearer={TOKEN} "
        f"+data.conn='DefaultEndpointsProtocol=https;AccountKey={TOKEN}' data.root={SAS_URL}"
    )
    shown = redact_text(line)
    assert TOKEN not in shown and SIGNATURE not in shown
    assert shown.startswith("\t#0 : model.lr=0.1 +model.api_key=*** tracking.bearer=*** ")
    assert "sig=***&se=2030" in shown


def test_the_logging_filter_redacts_messages_arguments_and_tracebacks():
    record = logging.LogRecord("x", logging.ERROR, "f", 1, "uri %s", (f"http://u:{TOKEN}@h",), None)
    try:
        raise ValueError(f"tracking.bearer={TOKEN}")
    except ValueError as e:
        record.exc_info = (type(e), e, e.__traceback__)
    assert SecretFilter().filter(record)
    assert record.getMessage() == "uri http://***@h" and TOKEN not in record.exc_text


def test_a_saved_config_is_rewritten_with_its_secrets_redacted(tmp_path: Path):
    path = tmp_path / "hydra.yaml"
    path.write_text(
        "hydra:\n  overrides:\n    task:\n"
        f"    - +model.api_key={TOKEN}\n    - tracking.uri=http://u:{PASSWORD}@h\n"
        f"  job:\n    env_set:\n      API_TOKEN: {TOKEN}\n    override_dirname: x.token={TOKEN}\n"
        "model:\n  lr: 0.1\n  filters: [8, 16]\n"
    )
    path.chmod(0o644)
    redact_yaml_file(path)
    text = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o644
    assert not any(s in text for s in SECRETS), text
    assert "+model.api_key=***" in text and "http://***@h" in text and "filters:\n  - 8" in text


def test_a_saved_config_that_cannot_be_redacted_is_removed(tmp_path: Path):
    (tmp_path / "multirun.yaml").write_text(f"token: [{TOKEN}\n")  # not YAML
    RedactHydraFiles().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": tmp_path}}}))
    assert not (tmp_path / "multirun.yaml").exists()


# ---------------------------------------------------------------- real runs and sweeps
def test_a_sweep_prints_and_saves_no_secret(tmp_path: Path, mlflow_server: str):
    uri = mlflow_server.replace("http://", f"http://alice:{PASSWORD}@")
    proc = sweep(
        "trainer=debug",
        "model.lr=0.001,0.01",
        f"tracking.uri={uri}",
        f"tracking.artifact_root='{SAS_URL}'",  # a known key; a server store ignores it
        f"+hydra.job.env_set.EQUIP_API_TOKEN={TOKEN}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/server/mlflow.db")
    parent, children = parent_and_children(client)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    launched = [line for line in proc.stdout.splitlines() if "[HYDRA]" in line]
    assert len(launched) == 3, launched  # Launching 2 jobs, #0 : ..., #1 : ...
    assert all("tracking.uri=http\\://***@127.0.0.1" in x for x in launched[1:])  # : escaped
    assert not leaks([proc.stdout, proc.stderr], tmp_path)  # the server's store too
    saved = hydra_files(tmp_path / "multirun")
    assert len(saved) == 7  # multirun.yaml + 3 per job
    texts = [p.read_text() for p in saved]
    assert all("***@127.0.0.1" in t and "sig=***" in t for t in texts)
    assert "EQUIP_API_TOKEN: '***'" in texts[-1]  # multirun.yaml


def test_a_run_prints_and_saves_no_secret(tmp_path: Path, mlflow_server: str):
    write_photos(tmp_path / "photos", 4)
    uri = mlflow_server.replace("http://", f"http://alice:{PASSWORD}@")
    proc = run_cli(
        *FOLDER_FAST,
        "tracking.log_model=false",
        "data=folder",
        f"data.root={tmp_path / 'photos'}",
        f"tracking.uri={uri}",
        f"tracking.artifact_root='{SAS_URL}'",
        cwd=tmp_path,
        tiny=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not leaks([proc.stdout, proc.stderr], tmp_path)
    [config] = tmp_path.glob("outputs/*/*/.hydra/config.yaml")
    assert "http://***@127.0.0.1" in config.read_text() and "sig=***" in config.read_text()


@pytest.mark.parametrize("root", [SAS_URL, f"http://bob:{PASSWORD}@host/x"])
def test_a_refused_run_with_a_secret_data_root_leaks_nothing(tmp_path: Path, root: str):
    args = [*FOLDER_FAST, "data=folder", f"data.root='{root}'"]
    proc = train_in_process(args, tmp_path)
    assert proc.returncode != 0 and "data.root" in proc.stderr
    assert "***" in proc.stderr
    assert not leaks([proc.stdout, proc.stderr], tmp_path)
    overrides = next(tmp_path.glob("outputs/*/*/.hydra/overrides.yaml")).read_text()
    assert "data.root=" in overrides and "***" in overrides
