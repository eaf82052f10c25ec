"""What `python -m equip.deploy` deploys: its settings (key=value, checked), the model reference,
and the managed online endpoint and deployment as the azure-ai-ml SDK's own entities, written as
the YAML `az ml online-endpoint/online-deployment create --file` take (the dry run).

Nothing here touches the network. The deployment names a registered MLflow model and nothing
else (no scoring script, no environment): Azure ML serves MLflow models without code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from equip.errors import EquipError

TARGETS = ("azureml", "local")
# Azure ML endpoint and deployment names: 3-32 letters, digits and hyphens, a letter first, no
# hyphen last (the endpoint's name is also its host name in the region).
AZURE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")
REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")
LOCAL_REGISTRY = ("sqlite:", "file:", "/")  # registries read without any network


@dataclass
class WorkspaceKeys:
    """The workspace, named as train.py's tracking=azureml names it (tracking.*)."""

    kind: str = "azureml"
    uri: str | None = None  # the registry's MLflow URI; null: the workspace's, asked of Azure
    config_path: str | None = None
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None


@dataclass
class DeploySettings:
    target: str = MISSING  # azureml | local
    model: str = "models:/equip-gear@champion"
    endpoint: str | None = None  # null: the model's name
    deployment: str | None = None  # null: <model>-v<version>
    instance_type: str = "Standard_DS3_v2"
    instance_count: int = 1
    traffic: int = 100  # percent of the endpoint's requests this deployment answers
    dry_run: bool = False
    folder: str = "deploy"  # where the dry run writes endpoint.yaml and deployment.yaml
    port: int | None = None  # target=local: the app's port and host (its defaults when null)
    host: str | None = None
    tracking: WorkspaceKeys = field(default_factory=WorkspaceKeys)


# The keys and their defaults (tests/test_docs.py checks documented commands' keys against them).
DEFAULTS: dict[str, Any] = dataclasses.asdict(DeploySettings())


@dataclass
class ModelRef:
    """The registered model to deploy; `version` is None until the registry has been read."""

    name: str
    version: str | None
    alias: str | None

    @property
    def azure(self) -> str:
        """The reference in the workspace's registry; an unread champion: its latest version
        stands in (the dry run only, which reads no remote registry)."""
        return (
            f"azureml:{self.name}:{self.version}" if self.version else f"azureml:{self.name}@latest"
        )


def parse(args: list[str]) -> DictConfig:
    """The settings from key=value arguments, each key and value checked (one line each)."""
    from omegaconf.errors import OmegaConfBaseException

    # tracking=azureml, as train.py takes it, is what target=azureml means anyway
    args = [a for a in args if a != "tracking=azureml"]
    schema = OmegaConf.structured(DeploySettings)
    try:
        given = OmegaConf.from_dotlist(args)
    except OmegaConfBaseException as e:
        raise EquipError(f"cannot read the arguments {' '.join(args)}: {e.msg}") from None
    _check_keys(given, schema)
    try:
        cfg = OmegaConf.merge(schema, given)
    except OmegaConfBaseException as e:
        value = OmegaConf.select(given, e.full_key, default=None)
        raise EquipError(
            f"{e.full_key}={value}: {str(e.msg).splitlines()[0]}; see python -m equip.deploy -h"
        ) from None
    _check_values(cfg)
    return cfg


def _check_keys(given: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    keys = list(schema.keys())  # (`in` on the config itself skips the ??? target)
    for key, value in given.items():
        if key not in keys:
            known = ", ".join(f"{prefix}{k}" for k in keys)
            raise EquipError(
                f"unknown key {prefix}{key}=...; python -m equip.deploy takes {known}."
            )
        if isinstance(value, DictConfig) and isinstance(schema[key], DictConfig):
            _check_keys(value, schema[key], f"{prefix}{key}.")


def _check_values(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "target"):
        raise EquipError("missing target=azureml or target=local; see python -m equip.deploy -h")
    if cfg.target not in TARGETS:
        raise EquipError(f"target={cfg.target}: use one of {', '.join(TARGETS)}.")
    if cfg.target == "local":
        return
    if not REGISTERED.match(cfg.model):
        raise EquipError(
            f"model={cfg.model}: Azure ML deploys a registered model: give "
            "models:/NAME@champion or models:/NAME/VERSION."
        )
    for key in ("endpoint", "deployment"):
        if cfg[key] is not None and not AZURE_NAME.match(cfg[key]):
            raise EquipError(
                f"{key}={cfg[key]!r} is not an Azure ML {key} name: 3-32 letters, digits or "
                "hyphens, a letter first and no hyphen last."
            )
    if cfg.instance_count < 1:
        raise EquipError(f"instance_count={cfg.instance_count}: deploy at least 1 instance.")
    if not 0 <= cfg.traffic <= 100:
        raise EquipError(f"traffic={cfg.traffic}: a percentage, 0 to 100.")


def model_ref(cfg: DictConfig) -> ModelRef:
    found = REGISTERED.match(cfg.model)
    assert found is not None  # checked by parse()
    return ModelRef(found["name"], found["version"], found["alias"])


def registry_is_local(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(LOCAL_REGISTRY)


def slug(name: str) -> str:
    """An Azure ML name made from a model's name (letters, digits, hyphens; a letter first)."""
    text = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")
    return text if text[:1].isalpha() else f"m-{text}"


def names(cfg: DictConfig, ref: ModelRef) -> tuple[str, str]:
    """(endpoint, deployment): given, or made from the model's name and version."""
    endpoint = cfg.endpoint or slug(ref.name)[:32].rstrip("-")
    suffix = f"-v{ref.version}" if ref.version else f"-{slug(ref.alias or 'latest')}"
    deployment = cfg.deployment or slug(ref.name)[: 32 - len(suffix)].rstrip("-") + suffix
    for key, value in (("endpoint", endpoint), ("deployment", deployment)):
        if not AZURE_NAME.match(value):
            raise EquipError(
                f"the {key} name {value!r} made from model={cfg.model} is not an Azure ML name; "
                f"give {key}=NAME (3-32 letters, digits or hyphens)."
            )
    return endpoint, deployment


def entities(cfg: DictConfig, ref: ModelRef, endpoint: str, deployment: str) -> tuple[Any, Any]:
    """The SDK's ManagedOnlineEndpoint (key auth) and ManagedOnlineDeployment of the model."""
    from azure.ai.ml.entities import ManagedOnlineDeployment, ManagedOnlineEndpoint

    tags = {"equip.model": cfg.model}
    ep = ManagedOnlineEndpoint(
        name=endpoint, auth_mode="key", description=f"equip: {ref.name}", tags=tags
    )
    dep = ManagedOnlineDeployment(
        name=deployment,
        endpoint_name=endpoint,
        model=ref.azure,
        instance_type=cfg.instance_type,
        instance_count=cfg.instance_count,
        description=f"equip: {cfg.model} as {ref.azure} (MLflow model, no scoring script)",
        tags=tags,
    )
    return ep, dep


def write_files(folder: Path, endpoint: Any, deployment: Any, note: str = "") -> list[Path]:
    """endpoint.yaml and deployment.yaml, each read back with the SDK's own loader (offline)."""
    import yaml
    from azure.ai.ml import load_online_deployment, load_online_endpoint

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, entity, load in (
        ("endpoint.yaml", endpoint, load_online_endpoint),
        ("deployment.yaml", deployment, load_online_deployment),
    ):
        path = folder / name
        spec = json.loads(json.dumps(entity._to_dict()))
        header = f"# {note}\n" if note and name == "deployment.yaml" else ""
        path.write_text(header + yaml.safe_dump(spec, sort_keys=False, width=1000))
        try:
            load(path)
        except Exception as e:
            why = str(e).strip().splitlines()[0]
            raise EquipError(f"{path} does not pass the Azure ML schema: {why}") from None
        written.append(path)
    return written


def local_app_args(cfg: DictConfig) -> list[str]:
    """target=local: the arguments of `python -m equip.app` for the same model."""
    args = [f"model={cfg.model}"]
    args += [f"{key}={cfg[key]}" for key in ("port", "host") if cfg[key] is not None]
    return args
