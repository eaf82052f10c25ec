"""An Azure ML workspace as a tracking store: its names, and its MLflow URI read from Azure."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import DictConfig

from equip.errors import EquipError


def require_azure_extra() -> None:
    try:
        import azureml.mlflow  # noqa: F401  # registers the azureml:// store with MLflow
    except ImportError:
        raise EquipError(
            'logging to Azure ML needs the Azure extra: pip install -e ".[azure]"'
        ) from None
    # azureml-mlflow and azure-core log every URI parse and HTTP request at INFO: under Hydra's
    # job logging that is a screenful per command. Their warnings still show.
    for name in ("azureml", "azure"):
        logging.getLogger(name).setLevel(logging.WARNING)


def workspace_of(tracking: DictConfig) -> tuple[str, str, str]:
    """(subscription, resource group, workspace name) from tracking.config_path or the keys."""
    if tracking.config_path:
        import json

        path = Path(tracking.config_path).expanduser()
        try:
            ws = json.loads(path.read_text())
            return ws["subscription_id"], ws["resource_group"], ws["workspace_name"]
        except (OSError, ValueError, KeyError) as e:
            raise EquipError(
                f"tracking.config_path={path}: not a workspace config.json ({e}). Download it "
                "from the workspace page in the Azure portal."
            ) from None
    keys = ("subscription_id", "resource_group", "workspace_name")
    missing = [k for k in keys if not tracking.get(k)]
    if missing:
        raise EquipError(
            f"tracking=azureml needs tracking.config_path=PATH/config.json, or all of "
            f"tracking.{', tracking.'.join(keys)} (missing: {', '.join(missing)})."
        )
    return tracking.subscription_id, tracking.resource_group, tracking.workspace_name


def azureml_uri(tracking: DictConfig) -> str:
    """The workspace's MLflow tracking URI, read from Azure Resource Manager.

    One GET with an azure-identity token: the azure-ai-ml SDK would answer the same question but
    pulls in a large dependency tree for it. The token is used in memory only, never logged."""
    import json

    require_azure_extra()
    sub, group, name = workspace_of(tracking)
    from azure.identity import DefaultAzureCredential

    logging.getLogger("azure.identity").setLevel(logging.ERROR)  # its failure is reported below
    try:
        token = DefaultAzureCredential(exclude_interactive_browser_credential=True).get_token(
            "https://management.azure.com/.default"
        )
    except Exception as e:  # azure-identity raises several types; its text names no secret
        raise EquipError(
            "no usable Azure credentials: sign in with `az login`, or set AZURE_CLIENT_ID, "
            "AZURE_TENANT_ID and AZURE_CLIENT_SECRET for a service principal (inside an Azure "
            f"ML job MLFLOW_TRACKING_URI is set for you). Azure said: {str(e).splitlines()[0]}"
        ) from None
    url = (
        f"https://management.azure.com/subscriptions/{sub}/resourceGroups/{group}/providers/"
        f"Microsoft.MachineLearningServices/workspaces/{name}?api-version=2024-04-01"
    )
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token.token}"})
    try:
        # build_opener: the environment's proxy as it is now (urlopen keeps the first one seen)
        with urllib.request.build_opener().open(request, timeout=30) as answer:
            return json.load(answer)["properties"]["mlFlowTrackingUri"]
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise EquipError(
                f"Azure did not accept your credentials for workspace {name} (HTTP {e.code}): "
                "sign in again with `az login`, or check your access to the workspace."
            ) from None
        raise _lookup_failed(name, group, sub, e) from None
    except (OSError, ValueError, KeyError) as e:
        raise _lookup_failed(name, group, sub, e) from None


def _lookup_failed(name: str, group: str, sub: str, e: Exception) -> EquipError:
    return EquipError(
        f"could not read the MLflow URI of workspace {name} (resource group {group}, "
        f"subscription {sub}): {e}. Check the names and your access to the workspace."
    )
