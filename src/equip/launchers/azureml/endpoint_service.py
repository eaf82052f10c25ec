"""`python -m equip.deploy target=azureml`: the champion (or a given version) of the registry as a
managed online endpoint of the workspace.

The champion's version is read from the MLflow registry (the version tagged equip.champion=true,
equip.track.champion: a workspace's registry has no aliases) and deployed as `azureml:NAME:VERSION`.
Through the SDK's MLClient: the endpoint is created when it does not exist yet (key auth; an
existing one is kept as it is, with its traffic), then the deployment, then the traffic is moved
to it. The scoring URL is printed with the command that fetches the key; equip never asks for
the key itself, so it cannot print or log it. `dry_run=true` writes and checks the YAML instead
and sends nothing (endpoint_spec).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from equip.errors import EquipError
from equip.launchers.azureml import endpoint_spec as spec
from equip.launchers.azureml.endpoint_spec import ModelRef
from equip.launchers.azureml.service import azure_errors, not_found, workspace_client
from equip.launchers.azureml.settings import require_sdk
from equip.terminal import say
from equip.track import champion, schema, store
from equip.track.redaction import strip_secrets

REGISTER_HINT = (
    "register one with python train.py tracking=azureml tracking.config_path=config.json "
    "registry.enabled=true ..., or give model=models:/NAME/VERSION"
)


def deploy(cfg: DictConfig) -> int:
    require_sdk("python -m equip.deploy target=azureml")
    ref = spec.model_ref(cfg)
    if cfg.dry_run:
        return dry_run(cfg, ref)
    ref = read_version(ref, store.resolve_uri(cfg.tracking))
    endpoint, deployment = spec.names(cfg, ref)
    ep, dep = spec.entities(cfg, ref, endpoint, deployment)
    client = workspace_client(cfg.tracking)
    with azure_errors(f"endpoint {endpoint}"):
        existing = find_endpoint(client, endpoint)
    traffic = traffic_split(existing.traffic if existing else {}, deployment, cfg.traffic)
    if existing is None:
        say(f"creating endpoint {endpoint} (key auth)")
        with azure_errors(f"endpoint {endpoint}"):
            client.online_endpoints.begin_create_or_update(ep).result()
    say(f"creating deployment {deployment} of {ref.azure}: Azure ML starts it (minutes)")
    with azure_errors(f"deployment {deployment}"):
        client.online_deployments.begin_create_or_update(dep).result()
        current = client.online_endpoints.get(endpoint)
        current.traffic = traffic
        client.online_endpoints.begin_create_or_update(current).result()
        done = client.online_endpoints.get(endpoint)
    where = (
        f"--resource-group {client.resource_group_name} --workspace-name {client.workspace_name}"
    )
    print(
        f"deployed {cfg.model} ({ref.azure}) to endpoint {endpoint} as deployment {deployment}: "
        f"{cfg.instance_count} x {cfg.instance_type}, {traffic[deployment]}% of the traffic"
    )
    print(f"scoring URL: {done.scoring_uri}")
    print(f"its key: az ml online-endpoint get-credentials --name {endpoint} {where}")
    return 0


def find_endpoint(client: Any, name: str) -> Any | None:
    try:
        return client.online_endpoints.get(name)
    except Exception as e:
        if not_found(e):
            return None
        raise


def traffic_split(current: dict[str, int], deployment: str, share: int) -> dict[str, int]:
    """`share`% to the new deployment; the rest to the deployments that take traffic now, in
    their present proportions (Azure ML wants the shares to add up to 100)."""
    others = {k: int(v) for k, v in (current or {}).items() if k != deployment and int(v) > 0}
    rest = 100 - share
    if rest and not others:
        raise EquipError(
            f"traffic={share}: no other deployment of the endpoint takes the other {rest}%; "
            "use traffic=100 (or deploy one first)."
        )
    total = sum(others.values())
    split = {k: v * rest // total for k, v in others.items()}
    if others:  # what the rounding down left over goes to the largest share
        largest = max(others, key=others.__getitem__)
        split[largest] += rest - sum(split.values())
    return {deployment: share, **split}


def read_version(ref: ModelRef, uri: str) -> ModelRef:
    """The champion's version, read from the registry at `uri` (a given version: as it is)."""
    if ref.version is not None:
        return ref
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise EquipError(f"tracking.uri={uri}: no such store; {REGISTER_HINT}.")
    store.open_store(uri, create=False)  # waits while another command creates it
    client = MlflowClient(uri, registry_uri=uri)
    found = champion.current(client, ref.name, ref.alias or "champion")
    if found is None:
        tag = schema.champion_tag(ref.alias or "champion")
        raise EquipError(
            f"models:/{ref.name}@{ref.alias}: no version of registered model {ref.name!r} is "
            f"tagged {tag}=true in {strip_secrets(uri)}; {REGISTER_HINT}."
        )
    return ModelRef(ref.name, str(found.version), ref.alias)


def dry_run(cfg: DictConfig, ref: ModelRef) -> int:
    """The YAML files, checked offline; the champion is read only from a local registry."""
    uri = cfg.tracking.uri or store.USER_TRACKING_URI
    note = ""
    if ref.version is None and spec.registry_is_local(uri):
        ref = read_version(ref, store.resolve_uri(cfg.tracking))
    elif ref.version is None:
        note = (
            f"{cfg.model} is read from the workspace's registry when deploying (a dry run reads "
            f"no remote registry); {ref.azure} stands in for it here."
        )
    endpoint, deployment = spec.names(cfg, ref)
    ep, dep = spec.entities(cfg, ref, endpoint, deployment)
    files = spec.write_files(Path(cfg.folder), ep, dep, note)
    if note:
        say(note)
    print(f"dry run: nothing sent to Azure; {files[0]} and {files[1]} pass the SDK's schema.")
    print(
        f"it would create endpoint {endpoint} (unless it exists) and deployment {deployment} of "
        f"{ref.azure} on {cfg.instance_count} x {cfg.instance_type}, and give it "
        f"{cfg.traffic}% of the traffic; with the Azure CLI:"
    )
    print(f"  az ml online-endpoint create --file {files[0]}")
    print(f"  az ml online-deployment create --file {files[1]}")
    print(
        f'  az ml online-endpoint update --name {endpoint} --traffic "{deployment}={cfg.traffic}"'
    )
    return 0
