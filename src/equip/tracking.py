"""MLflow: where runs go, what a run is called, and what of the config becomes params.

Imported by commands that train; mlflow itself is imported inside functions so that
`equip.tracking` stays cheap for commands that only read configs.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from equip.errors import EquipError

log = logging.getLogger(__name__)

# Keys whose values are never logged anywhere (params, tags, artifacts).
SECRET_KEY = re.compile(
    r"secret|passw|pwd|token|credential|api_?key|access_?key|account_?key|private_?key|"
    r"connection_?string|auth|sas",
    re.I,
)
URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ in a URI
# The user's own setting, read before mlflow.set_tracking_uri() exports its choice to the
# environment (it does, for child processes): later runs in this process must not mistake it.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
REDACTED = "***"
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in mlflow 3


def resolve_uri(tracking: DictConfig) -> str:
    """MLFLOW_TRACKING_URI wins (Azure ML jobs inject it); a relative sqlite path is made absolute
    against the launch directory so every job of a sweep writes to the same store."""
    uri = USER_TRACKING_URI or tracking.uri
    if not uri and tracking.get("kind") == "azureml":
        uri = azureml_uri(tracking)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def default_uri() -> str:
    """For commands without a config (report, predict): the environment's store, else the
    default local one in this folder, as train.py would use."""
    return resolve_uri(OmegaConf.create({"uri": "sqlite:///mlflow.db"}))


def connect(tracking: DictConfig) -> str:
    """Point MLflow at the store and fail in seconds, with a fix, when it cannot be used."""
    import mlflow

    uri = resolve_uri(tracking)
    if uri.startswith("azureml:"):
        _require_azure_extra()
    elif uri.startswith(("http://", "https://")):
        # MLflow's own client retries for minutes on a dead server; keep the retries short.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        probe = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(probe, timeout=5).close()
        except (urllib.error.URLError, OSError) as e:
            # An HTTP error answer (404, 401...) proves the server is there; only no answer fails.
            if not isinstance(e, urllib.error.HTTPError):
                raise EquipError(
                    f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)}). "
                    "Start it (mlflow server --host 127.0.0.1 --port 5000), fix tracking.uri / "
                    "MLFLOW_TRACKING_URI, or unset them to log to the local sqlite store."
                ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EquipError(f"cannot create the MLflow store folder {db.parent}: {e}") from None
        if not os.access(db.parent, os.W_OK):
            raise EquipError(f"tracking.uri={uri}: folder {db.parent} is not writable.")
    mlflow.set_tracking_uri(uri)
    return uri


def _require_azure_extra() -> None:
    try:
        import azureml.mlflow  # noqa: F401  # registers the azureml:// store with MLflow
    except ImportError:
        raise EquipError(
            'logging to Azure ML needs the Azure extra: pip install -e ".[azure]"'
        ) from None


def _workspace(tracking: DictConfig) -> tuple[str, str, str]:
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

    _require_azure_extra()
    sub, group, name = _workspace(tracking)
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
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)["properties"]["mlFlowTrackingUri"]
    except (OSError, ValueError, KeyError) as e:
        raise EquipError(
            f"could not read the MLflow URI of workspace {name} (resource group {group}, "
            f"subscription {sub}): {e}. Check the names and your access to the workspace."
        ) from None


def experiment_id(name: str, artifact_root: str | None) -> str:
    """Get or create the experiment; local stores keep artifacts under `artifact_root`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root and client.tracking_uri.startswith(("sqlite:", "file:", "/")):
        location = (Path(artifact_root).resolve() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # a parallel job created it first
        return client.get_experiment_by_name(name).experiment_id


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict/list config -> {'a.b.c': leaf}; lists of scalars stay one value."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            if k == "_target_":
                continue
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and any(isinstance(v, Mapping | list) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def strip_credentials(text: str) -> str:
    """https://user:pw@host/x -> https://***@host/x"""
    return URI_CREDENTIALS.sub(f"{REDACTED}@", text)


def redact_value(key: str, value: Any) -> Any:
    """*** for secret-looking keys; credentials inside URIs are cut out of any value."""
    if SECRET_KEY.search(key):
        return REDACTED
    return strip_credentials(value) if isinstance(value, str) else value


def redact(items: Mapping[str, Any]) -> dict[str, Any]:
    return {k: redact_value(k, v) for k, v in items.items()}


def config_params(cfg: DictConfig) -> dict[str, str]:
    """Every leaf of the composed config as a flat dotted param, within MLflow's limits."""
    tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    params = {}
    for k, v in redact(flatten(tree)).items():
        text = "null" if v is None else str(v)
        params[k] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return params


def redacted_yaml(cfg: DictConfig) -> str:
    tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)

    def scrub(node: Any, key: str = "") -> Any:
        if SECRET_KEY.search(key):  # the whole subtree of a secret key, not just its leaves
            return REDACTED
        if isinstance(node, dict):
            return {k: scrub(v, str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v, key) for v in node]
        return redact_value(key, node)

    return OmegaConf.to_yaml(scrub(tree))


def redact_overrides(overrides: Iterable[str]) -> list[str]:
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        # A secret may hide in the value too: +data.auth={api_key:X}
        if eq and (SECRET_KEY.search(key) or SECRET_KEY.search(value)):
            out.append(f"{key}={REDACTED}")
        else:
            out.append(strip_credentials(o))
    return out


# Overrides that change where or how verbosely a run is recorded, not what it trains.
NOT_IN_RUN_NAME = ("hydra.", "tracking", "trainer.progress_bar", "sweep", "register")


def _short(value: str) -> str:
    """'[32,64]' -> '32-64'; '0.0012520653814999472' -> '0.00125' (sampled values are long)."""
    try:
        number = float(value)
    except ValueError:
        return value.strip("[]").replace(",", "-").replace(" ", "")
    return value if number.is_integer() else f"{number:.3g}"


def run_name(cfg: DictConfig, overrides: Iterable[str] = ()) -> str:
    """Name a run by what distinguishes it: filters and lr always, then each command-line
    override, e.g. 'filters=32-64 lr=0.001 batch_norm=true'."""
    if cfg.model.name == "baseline":
        parts = {"baseline": str(cfg.model.estimator)}
    else:
        parts = {"filters": _short(str(list(cfg.model.filters))), "lr": f"{cfg.model.lr:.3g}"}
    for o in redact_overrides(overrides):
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if (
            not value
            or key.startswith(NOT_IN_RUN_NAME)
            or key in ("model", "model.filters", "model.estimator")
        ):
            continue
        if key == "data.root":
            value = Path(value).name
        parts[key.split(".")[-1]] = _short(value)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def git_tags(cwd: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the code that ran; empty outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def run_location(uri: str, experiment: str, run_id: str) -> str:
    """Where a person finds the run: a UI link for servers, the `mlflow ui` command otherwise."""
    uri = strip_credentials(uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"run {run_id} in {uri}  (browse: mlflow ui --backend-store-uri {uri})"


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """All metrics of one step in a single request (one call per metric costs ~3 ms on sqlite)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    if batch:
        MlflowClient().log_batch(run_id, metrics=batch, synchronous=True)
