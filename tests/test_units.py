"""Fast tests of the pure helpers: run names, redaction, swept keys, sweep points, ranking,
job context. No training, no store."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from equip.sweep.callback import sweep_key, sweep_name, sweep_points, swept_keys
from equip.sweep.context import JobContext, config_hash, swept_overrides
from equip.sweep.leaderboard import rank
from equip.terminal import fail
from equip.track import schema
from equip.track.record import config_params, run_name
from equip.track.redaction import redact_overrides, redact_tree, strip_secrets
from tests.conftest import make_cfg


def test_run_names_say_what_distinguishes_a_run():
    cfg = make_cfg("model.filters=[8,16]", "model.lr=0.003")
    assert run_name(cfg, ["model.lr=0.003"]) == "filters=8-16 lr=0.003"
    assert (
        run_name(
            cfg,
            [
                "model.batch_norm=true",
                "tracking.uri=x",
                "hydra/launcher=joblib",
                "trainer.progress_bar=false",
                "multirun.resume=false",
            ],
        )
        == "filters=8-16 lr=0.003 batch_norm=true"
    )
    assert run_name(cfg, ["data.root=/a/b/gear_images"]).endswith("root=gear_images")
    assert run_name(cfg, ["model.lr=0.0012520653814999472"]).endswith("lr=0.00125")
    base = make_cfg("model=baseline", "model.estimator=svm")
    assert run_name(base, ["model=baseline", "model.estimator=svm"]) == "baseline=svm"


def test_a_sweep_job_is_named_by_its_swept_values_only():
    job = JobContext(
        overrides=["model.lr=0.01", "data.image_size=32", "model.filters=[8]"],
        parent_run_id="p",
        swept_keys=["model.lr", "model.filters"],
    )
    assert job.name_overrides() == ["model.lr=0.01", "model.filters=[8]"]
    assert JobContext(overrides=["a=1"]).name_overrides() == ["a=1"]
    assert swept_overrides(["+x.y=1", "z=2"], ["x.y"]) == ["+x.y=1"]


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abcDEF123==;Suffix=x", "abcDEF"),
        ("https://acct.blob.core.windows.net/c?sv=2024&sig=AbC%2Bdef123&se=1", "AbC%2Bdef"),
        ("Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=S3cretKey=", "S3cretKey"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGci"),
        ("http://user:hunter2@127.0.0.1:5000", "hunter2"),
        ("postgresql://admin:pw123@db/mlflow", "pw123"),
    ],
)
def test_secret_values_are_cut_out_under_any_key(text: str, leaked: str):
    assert leaked not in strip_secrets(text)
    assert leaked not in str(redact_tree({"data": {"conn": text}}))
    assert leaked not in " ".join(redact_overrides([f"+data.conn={text}"]))


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "tracking.bearer",
        "azure.client_secret",
        "storage.account_key",
        "api_key",
        "x.token",
        "sas_token",
        "blob.signature",
        "db.connection_string",
        "key",
        "service.sig",
    ],
)
def test_secret_keys_are_redacted_whole(key: str):
    tree = redact_tree(OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}=v4lue"])))
    assert "v4lue" not in str(tree)


def test_plain_config_keys_are_not_mistaken_for_secrets():
    params = config_params(make_cfg())
    assert "***" not in params.values()


def test_identity_ignores_where_and_how_a_run_is_recorded():
    a = make_cfg()
    b = make_cfg(
        "tracking.experiment=other",
        "trainer.progress_bar=true",
        "multirun.resume=false",
        "registry.name=x",
    )
    assert config_hash(a, "fp") == config_hash(b, "fp")
    assert config_hash(a, "fp") != config_hash(make_cfg("model.lr=0.1"), "fp")
    assert config_hash(a, "fp") != config_hash(a, "other data")
    assert not schema.is_identity_key("hydra/launcher") and schema.is_identity_key("sweep")


def sweep_config(*task: str, params: dict | None = None):
    return OmegaConf.create(
        {
            "tracking": {"experiment": "equip"},
            "hydra": {"overrides": {"task": list(task)}, "sweeper": {"params": params or {}}},
        }
    )


def test_swept_keys_points_and_names():
    cfg = sweep_config(
        "model.filters=[8],[8,16]",
        "model.lr=0.1,0.2",
        "data.image_size=32",
        "sweep=smoke",
        params={"model.kernel_sizes": "3,5"},
    )
    assert swept_keys(cfg) == ["model.kernel_sizes", "model.filters", "model.lr"]
    points = sweep_points(cfg)
    assert len(points) == 8 and points[0] == [
        "model.kernel_sizes=3",
        "model.filters=[8]",
        "model.lr=0.1",
        "data.image_size=32",
        "sweep=smoke",
    ]
    assert sweep_name(cfg, swept_keys(cfg)) == "sweep smoke filters=[8],[8,16] lr=0.1,0.2"
    assert swept_keys(sweep_config("model.lr=tag(log, interval(0.001, 0.1))")) == ["model.lr"]
    assert swept_keys(sweep_config("model.filters=[8,16]")) == []


def test_sweep_key_ignores_launch_and_tracking_settings():
    a = sweep_config("model.lr=0.1,0.2")
    b = sweep_config(
        "model.lr=0.1,0.2",
        "hydra/launcher=joblib",
        "tracking.uri=http://x",
        "hydra.launcher.n_jobs=2",
    )
    assert sweep_key(a) == sweep_key(b) != sweep_key(sweep_config("model.lr=0.1,0.3"))


def row(name: str, status: str, acc: float | None, config: str | None = None) -> dict:
    return {
        "run_name": name,
        "status": status,
        "best_val_acc": acc,
        "best_val_loss": acc,
        "config_hash": config or name,
    }


def test_leaderboard_ranks_finished_best_first_and_keeps_one_attempt_per_config():
    rows = [
        row("a", "FINISHED", 0.5),
        row("b", "FAILED", None),
        row("c", "FINISHED", 0.9),
        row("c-retry", "FAILED", None, config="c"),
        row("d", "FINISHED", float("nan")),
    ]
    ranked = rank(rows, "val_acc")
    assert [r["run_name"] for r in ranked][:2] == ["c", "a"]
    assert "c-retry" not in [r["run_name"] for r in ranked]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]
    by_loss = rank([row("a", "FINISHED", 0.5), row("c", "FINISHED", 0.9)], "val_loss")
    assert [r["run_name"] for r in by_loss] == ["a", "c"]  # lower loss is better


def test_fail_prints_plain_lines_without_secrets_and_exits(capsys):
    with pytest.raises(SystemExit) as stop:
        fail("bad [/y] AccountKey=abc", 2, details=["  model.filters=[/x] http://u:pw@h"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "equip: error: bad [/y] AccountKey=***",
        "  model.filters=[/x] http://***@h",
    ]
