"""Azure ML tracking set-up errors, and secrets kept out of everything MLflow records.

No test reaches Azure or any network: AZURE_TOKEN_CREDENTIALS limits azure-identity to the Azure
CLI credential, which is absent here, so no token request or metadata probe is ever sent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from equip.errors import EquipError
from equip.track.store import azureml_uri
from equip.train.run import train
from tests.conftest import make_cfg

needs_azure = pytest.mark.skipif(
    importlib.util.find_spec("azureml") is None, reason='needs pip install -e ".[azure]"'
)
SECRET = "s3cr3t-Value-that-must-not-leak"


def azure_cfg(*overrides: str):
    return make_cfg("tracking=azureml", *overrides).tracking


@needs_azure
def test_missing_workspace_settings_name_the_keys():
    with pytest.raises(
        EquipError,
        match=r"tracking.config_path=PATH/config.json(.|\n)*missing: "
        r"subscription_id, resource_group, workspace_name",
    ):
        azureml_uri(azure_cfg())


@needs_azure
def test_a_bad_config_json_is_named(tmp_path: Path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EquipError, match="config.json: not a workspace config.json"):
        azureml_uri(azure_cfg(f"tracking.config_path={tmp_path}/config.json"))


@needs_azure
def test_no_credentials_give_one_clear_message(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000000")
    monkeypatch.setenv("AZURE_TENANT_ID", "00000000-0000-0000-0000-000000000000")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential")
    ws = {"subscription_id": "sub", "resource_group": "rg", "workspace_name": "ws"}
    (tmp_path / "config.json").write_text(json.dumps(ws))
    with pytest.raises(
        EquipError, match="no usable Azure credentials: sign in with `az login`"
    ) as e:
        azureml_uri(azure_cfg(f"tracking.config_path={tmp_path}/config.json"))
    assert SECRET not in str(e.value)


def test_secrets_never_reach_params_tags_or_artifacts(store: str, monkeypatch):
    monkeypatch.setenv("AZURE_CLIENT_SECRET", SECRET)
    overrides = [  # notes.*: the one place for keys the schema lacks (others are refused)
        f"+notes.client_secret={SECRET}",
        f"+notes.sas_token={SECRET}",
        f"+notes.api_key={SECRET}",
        f"+notes.auth={{api_key:{SECRET}}}",
        f"+notes.mirror=https://user:{SECRET}@example.invalid/x",
    ]
    result = train(make_cfg(*overrides, "trainer.max_epochs=1"), overrides)
    client = MlflowClient(store)
    run = client.get_run(result["run_id"])
    assert run.data.params["notes.client_secret"] == "***"
    seen = [json.dumps(run.data.params), json.dumps(run.data.tags), run.info.run_name]

    def walk(path: str = "") -> None:
        for f in client.list_artifacts(run.info.run_id, path):
            if f.is_dir:
                walk(f.path)
            else:
                local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{f.path}")
                seen.append(Path(local).read_bytes().decode("latin-1"))

    walk()
    assert len(seen) > 8 and not any(SECRET in text for text in seen)
