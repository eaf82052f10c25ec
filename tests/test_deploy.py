"""python -m equip.deploy: the champion of a real MLflow registry (sqlite) as an Azure ML managed
online endpoint. The dry run's YAML is read back with the azure-ai-ml SDK's own loaders, with
every IPv4/IPv6 connection refused; the submission goes to a stand-in of the workspace's online
endpoint service that takes the SDK's own entities and refuses anything else (as
tests/test_azureml_launcher.py's stand-in job service does)."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

pytest.importorskip("azure.ai.ml")

from azure.ai.ml import load_online_deployment, load_online_endpoint  # noqa: E402

from equip.deploy import main  # noqa: E402
from equip.launchers.azureml import endpoint_service  # noqa: E402
from equip.launchers.azureml.endpoint_spec import local_app_args, parse  # noqa: E402

WORKSPACE = ["tracking.subscription_id=0000", "tracking.resource_group=rg"]
WORKSPACE += ["tracking.workspace_name=ws"]
KEY = "k3y-" + "s3cr3t" * 6  # what the stand-in would hand out for the endpoint's key


@pytest.fixture
def registry(store: str) -> str:
    """equip-gear versions 1-3 in a real sqlite registry; version 2 is the champion."""
    client = MlflowClient(store, registry_uri=store)
    client.create_registered_model("equip-gear")
    versions = [client.create_model_version("equip-gear", "file:///m") for _ in range(3)]
    client.set_model_version_tag("equip-gear", "2", "equip.champion", "true")
    assert [str(v.version) for v in versions] == ["1", "2", "3"]
    return store


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every IPv4/IPv6 connection refused; the attempts are returned."""
    attempts: list[Any] = []
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise ConnectionRefusedError("network is off in this test")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def one_error_line(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_dry_run_writes_what_the_sdk_loads_with_no_network(
    registry: str, tmp_path: Path, no_network: list, capsys
):
    args = ["target=azureml", f"tracking.uri={registry}", "dry_run=true", "folder=out"]
    assert main([*args, "instance_count=2", "instance_type=Standard_F4s_v2"]) == 0
    endpoint = load_online_endpoint(tmp_path / "out/endpoint.yaml")
    deployment = load_online_deployment(tmp_path / "out/deployment.yaml")
    assert endpoint.name == "equip-gear" and endpoint.auth_mode == "key"
    assert deployment.name == "equip-gear-v2" and deployment.endpoint_name == "equip-gear"
    assert deployment.model == "equip-gear:2"  # azureml:NAME:VERSION of the champion
    assert deployment.instance_type == "Standard_F4s_v2" and deployment.instance_count == 2
    assert deployment.environment is None and deployment.code_configuration is None  # no code
    out = capsys.readouterr().out
    assert "nothing sent to Azure" in out and "az ml online-deployment create --file out/" in out
    assert no_network == []

    # The workspace's registry is not read in a dry run: the latest version stands in, said so.
    assert main(["target=azureml", "dry_run=true", "endpoint=gear-ep"]) == 0
    written = (tmp_path / "deploy/deployment.yaml").read_text()
    assert yaml.safe_load(written)["model"] == "azureml:equip-gear@latest"
    assert written.startswith("# models:/equip-gear@champion is read from the workspace's")
    assert "stands in" in capsys.readouterr().err and no_network == []


class StandInEndpoints:
    """The workspace's online endpoints and deployments as equip.deploy uses them through
    MLClient, on this machine. It takes the SDK's entities, checks each against the SDK's own
    YAML schema (what `az ml` would send), and keeps the service's rules: a deployment needs its
    endpoint, traffic goes only to deployments that exist and adds up to 100 (or 0). It hands out
    the endpoint's key as the service would (get_keys); any other request fails the test."""

    def __init__(self, tmp_path: Path, existing: dict[str, int] | None = None) -> None:
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        self.folder, self.requests = tmp_path, []
        self.endpoints: dict[str, Any] = {}
        self.deployments: dict[str, Any] = {}
        if existing is not None:
            self.endpoints["equip-gear"] = ManagedOnlineEndpoint(
                name="equip-gear", traffic=existing
            )
            self.deployments.update(dict.fromkeys(existing))
        self.online_endpoints = Operations(self, ("get", "begin_create_or_update", "get_keys"))
        self.online_deployments = Operations(self, ("begin_create_or_update",))
        self.resource_group_name, self.workspace_name = "rg", "ws"

    def checked(self, entity: Any, load: Any) -> Any:
        path = self.folder / f"request-{len(self.requests)}.yaml"
        path.write_text(yaml.safe_dump(json.loads(json.dumps(entity._to_dict()))))
        return load(path)

    def get(self, name: str) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        if name not in self.endpoints:
            raise ResourceNotFoundError(f"(UserError) endpoint {name} not found")
        return self.endpoints[name]

    def put(self, entity: Any) -> SimpleNamespace:
        from azure.ai.ml.entities import ManagedOnlineDeployment

        if isinstance(entity, ManagedOnlineDeployment):
            assert entity.endpoint_name in self.endpoints, "a deployment of no endpoint"
            self.deployments[entity.name] = self.checked(entity, load_online_deployment)
            return SimpleNamespace(result=lambda: entity)
        traffic = {k: int(v) for k, v in (entity.traffic or {}).items()}
        assert set(traffic) <= set(self.deployments), f"traffic to no deployment: {traffic}"
        assert sum(traffic.values()) in (0, 100), f"traffic adds up to {sum(traffic.values())}"
        ep = self.checked(entity, load_online_endpoint)
        ep.traffic = traffic
        ep._scoring_uri = f"https://{ep.name}.westeurope.inference.ml.azure.com/score"
        self.endpoints[ep.name] = ep
        return SimpleNamespace(result=lambda: ep)


class Operations:
    """One operations group of MLClient: the listed requests, each recorded; no other."""

    def __init__(self, service: StandInEndpoints, allowed: tuple[str, ...]) -> None:
        self.service, self.allowed = service, allowed

    def __getattr__(self, name: str) -> Any:
        def request(*args: Any, **kwargs: Any) -> Any:
            self.service.requests.append((name, args[0] if args else kwargs))
            if name not in self.allowed:
                pytest.fail(f"the stand-in does not serve {name}{args}")  # e.g. get_keys
            if name == "get_keys":
                return SimpleNamespace(primary_key=KEY, secondary_key=KEY[::-1])
            handle = self.service.get if name == "get" else self.service.put
            return handle(*args, **kwargs)

        return request


def deploy(monkeypatch, service: StandInEndpoints, *args: str) -> int:
    monkeypatch.setattr(endpoint_service, "workspace_client", lambda tracking: service)
    return main(["target=azureml", *WORKSPACE, *args])


def test_the_champion_becomes_an_endpoint_with_its_url_printed_and_never_its_key(
    registry: str, tmp_path: Path, monkeypatch, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    service = StandInEndpoints(tmp_path)
    args = [f"tracking.uri={registry}", "instance_type=Standard_F2s_v2", "instance_count=3"]
    assert deploy(monkeypatch, service, *args) == 0

    dep = service.deployments["equip-gear-v2"]
    assert dep.model == "equip-gear:2"  # azureml:equip-gear:2, the version tagged champion
    assert (dep.instance_type, dep.instance_count) == ("Standard_F2s_v2", 3)
    assert dep.environment is None and dep.code_configuration is None  # no-code MLflow model
    assert service.endpoints["equip-gear"].traffic == {"equip-gear-v2": 100}
    assert [name for name, _ in service.requests] == [
        "get",  # does the endpoint exist? no:
        "begin_create_or_update",  # the endpoint
        "begin_create_or_update",  # the deployment
        "get",
        "begin_create_or_update",  # its traffic
        "get",  # its scoring URL
    ]
    out, err = capsys.readouterr()
    assert "scoring URL: https://equip-gear.westeurope.inference.ml.azure.com/score" in out
    assert "az ml online-endpoint get-credentials --name equip-gear --resource-group rg " in out
    for text in (out, err, caplog.text):  # not asked for (the request list), never shown
        assert KEY not in text and KEY[::-1] not in text


def test_a_new_version_takes_its_share_and_the_others_keep_theirs_in_proportion(
    registry: str, tmp_path: Path, monkeypatch, capsys
):
    service = StandInEndpoints(tmp_path, existing={"blue": 75, "green": 25})
    args = [f"tracking.uri={registry}", "model=models:/equip-gear/3", "traffic=20"]
    assert deploy(monkeypatch, service, *args) == 0
    assert service.endpoints["equip-gear"].traffic == {"equip-gear-v3": 20, "blue": 60, "green": 20}
    assert [name for name, _ in service.requests].count("begin_create_or_update") == 2  # kept
    assert "20% of the traffic" in capsys.readouterr().out


def test_a_share_no_other_deployment_can_take_is_refused_before_anything_is_made(
    registry: str, tmp_path: Path, monkeypatch, capsys
):
    service = StandInEndpoints(tmp_path)
    with pytest.raises(SystemExit):
        deploy(monkeypatch, service, f"tracking.uri={registry}", "traffic=50")
    assert "no other deployment of the endpoint takes the other 50%" in capsys.readouterr().err
    assert [name for name, _ in service.requests] == ["get"]


def test_no_champion_is_one_line_saying_how_to_register_one(
    registry: str, tmp_path: Path, monkeypatch, capsys
):
    MlflowClient(registry).delete_model_version_tag("equip-gear", "2", "equip.champion")
    service = StandInEndpoints(tmp_path)
    line = one_error_line(capsys, "target=azureml", *WORKSPACE, f"tracking.uri={registry}")
    assert "no version of registered model 'equip-gear' is tagged equip.champion=true" in line
    assert "register one with python train.py tracking=azureml" in line
    assert service.requests == []


@pytest.mark.parametrize(
    ("arg", "names"),
    [
        ("instances=2", "unknown key instances=...; python -m equip.deploy takes target, model"),
        ("tracking.workspace=ws", "unknown key tracking.workspace=..."),
        ("instance_count=two", "instance_count=two: Value 'two' of type 'str' could not be"),
        ("instance_count=0", "instance_count=0: deploy at least 1 instance"),
        ("traffic=120", "traffic=120: a percentage"),
        ("endpoint=gear_ep", "endpoint='gear_ep' is not an Azure ML endpoint name"),
        ("model=runs:/abc/model", "model=runs:/abc/model: Azure ML deploys a registered model"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(arg: str, names: str, tmp_path, capsys):
    assert names in one_error_line(capsys, "target=azureml", "dry_run=true", arg)
    assert not (tmp_path / "deploy").exists()


def test_without_the_azure_extra_it_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "azure.ai.ml", None)  # as if not installed
    line = one_error_line(capsys, "target=azureml", "dry_run=true")
    assert 'needs the Azure extra: pip install -e ".[azure]"' in line


def test_without_credentials_it_names_az_login_and_sends_nothing(
    registry: str, tmp_path: Path, monkeypatch, no_network: list, capsys
):
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential")  # no token endpoints
    monkeypatch.setenv("PATH", str(tmp_path))  # and no `az` to sign in with
    line = one_error_line(capsys, "target=azureml", *WORKSPACE, f"tracking.uri={registry}")
    assert "no usable Azure credentials: sign in with `az login`" in line
    assert no_network == []


def test_target_local_opens_the_app_on_the_same_model(monkeypatch):
    cfg = parse(["target=local", "model=models:/equip-gear@champion", "port=8123"])
    assert local_app_args(cfg) == ["model=models:/equip-gear@champion", "port=8123"]
    app = pytest.importorskip("equip.app")  # the web app (issue 19, item 1)
    seen: list[list[str]] = []
    monkeypatch.setattr(app, "main", lambda argv=None: seen.append(argv) or 0)
    assert main(["target=local", "host=0.0.0.0"]) == 0
    assert seen == [["model=models:/equip-gear@champion", "host=0.0.0.0"]]
