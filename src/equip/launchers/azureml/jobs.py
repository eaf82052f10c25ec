"""Azure ML command jobs built from a config: the command line, the environment (generated from
pyproject.toml), the data input, and the dry-run YAML checked with the SDK's own job schema.

Nothing here touches the network: it is what `hydra/launcher=azureml` (`launcher`) and
`+launch=azureml` (`run`) submit, and what their dry runs write. azure-ai-ml is imported only
inside the functions that build SDK objects.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from equip.errors import EquipError
from equip.track import schema, store

DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
# Azure ML compute names: a letter first, then letters, digits and hyphens (clusters allow
# 2-16 characters, compute instances up to 24); checked here so a typo fails before any upload.
COMPUTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,23}$")
# Of the tracking.* overrides a job keeps only these: the rest locate the workspace from outside
# (a job logs through the MLflow URI Azure ML injects), and data.root becomes the data input.
REMOTE_TRACKING_KEEP = ("tracking.experiment", "tracking.log_model")
LAUNCHER_ONLY = {"azure-ai-ml"}  # in the `azure` extra for the launcher; jobs do not need it
REMOTE_PATH = re.compile(r"^(azureml:|https://|wasbs://|abfss://|adl://)")
JOB_TAG = "equip.azureml_job"  # tag of the child run: the Azure ML job that trained it
KEY_TAG = "equip.launch_key"  # tag of the child run: its overrides and data, for resume
DATA_ARG = "data.root=${{inputs.data}}"  # the mounted input, substituted by Azure ML


@dataclass(frozen=True)
class Settings:
    """`hydra.launcher.*` (a sweep) or `launch.*` (a single run), as in
    conf/hydra/launcher/azureml.yaml."""

    compute: str | None = None
    max_concurrent: int = 4
    dry_run: bool = False
    image: str = DEFAULT_IMAGE
    python: str | None = None
    pins: str = "pyproject"
    pip_extra_index_url: str | None = None
    experiment_name: str | None = None
    data_mode: str = "ro_mount"
    poll_s: float = 20.0

    @classmethod
    def of(cls, values: Any) -> Settings:
        """From a config node or mapping; unknown keys (Hydra's _target_) are ignored."""
        if isinstance(values, DictConfig):
            values = OmegaConf.to_container(values, resolve=True)
        known = {f.name for f in fields(cls)}
        s = cls(**{k: v for k, v in dict(values).items() if k in known})
        py = s.python or f"{sys.version_info.major}.{sys.version_info.minor}"
        return cls(
            **{
                **s.__dict__,
                "python": py,
                "max_concurrent": max(1, int(s.max_concurrent)),
                "dry_run": bool(s.dry_run),
                "poll_s": float(s.poll_s),
            }
        )


@dataclass
class AzureJob:
    """One run as a command job, before and after submission."""

    idx: int
    overrides: list[str]
    cfg: DictConfig
    name: str
    display_name: str
    launch_key: str
    job: Any  # azure.ai.ml.entities.CommandJob
    local_data: Path | None = None
    status: str = "NotSubmitted"
    url: str = ""
    result: Any = None  # hydra.core.utils.JobReturn, once it ended


def new_tag() -> str:
    """Part of every job name of one launch: time and a random suffix (names are unique)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def quiet_sdk_logs() -> None:
    import logging

    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    logging.getLogger("azure.identity").setLevel(logging.ERROR)  # failures: one line of ours


def require_sdk(what: str) -> None:
    try:
        import azure.ai.ml  # noqa: F401
    except ImportError:
        raise EquipError(f'{what} needs the Azure extra: pip install -e ".[azure]"') from None
    quiet_sdk_logs()


def check_settings(config: DictConfig, compute: str | None, prefix: str) -> None:
    """Everything that can be wrong before the SDK is touched, as one EquipError."""
    if not compute:
        raise EquipError(
            f"Azure ML needs {prefix}.compute=NAME, the name of a compute cluster in the workspace."
        )
    if not COMPUTE_NAME.match(str(compute)) or str(compute).endswith("-"):
        raise EquipError(
            f"{prefix}.compute={compute!r} is not an Azure ML compute name: 2-24 "
            "letters, digits or hyphens, starting with a letter, e.g. "
            f"{prefix}.compute=cpu-cluster."
        )
    kind = config.tracking.get("kind")
    if kind != "azureml" and not str(store.USER_TRACKING_URI or "").startswith("azureml:"):
        raise EquipError(
            "Azure ML jobs log to the workspace: add tracking=azureml with "
            "tracking.config_path=config.json (or tracking.subscription_id, "
            "tracking.resource_group, tracking.workspace_name)."
        )
    store._workspace(config.tracking)  # names the missing keys


# ---------------------------------------------------------------- code and environment
def project_root_of(script: Path) -> Path:
    root = script.resolve().parent
    if not (root / "pyproject.toml").exists():
        raise EquipError(
            f"{root} has no pyproject.toml: Azure ML jobs ship the project folder "
            "and build their environment from pyproject.toml."
        )
    return root


def pip_requirements(project: Path, pins: str = "pyproject") -> list[str]:
    """The project's dependencies plus its `azure` extra (minus launcher-only packages), read from
    pyproject.toml. pins=installed pins each to the version installed here instead."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    reqs = [*meta.get("dependencies", []), *meta.get("optional-dependencies", {}).get("azure", [])]
    out = []
    for text in reqs:
        req = Requirement(text)
        if req.name in LAUNCHER_ONLY or req.name == meta["name"]:
            continue
        if pins == "installed":
            with contextlib.suppress(PackageNotFoundError):  # not installed: as declared
                text = f"{req.name}=={version(req.name).split('+')[0]}"  # no local labels (+cpu)
        elif pins != "pyproject":
            raise EquipError(f"pins={pins!r}: use pyproject or installed.")
        out.append(text)
    return out


def conda_spec(project: Path, python: str, pins: str, extra_index_url: str | None) -> dict:
    pip = pip_requirements(project, pins)
    if extra_index_url:
        pip.insert(0, f"--extra-index-url {extra_index_url}")
    return {
        "name": "equip",
        "channels": ["conda-forge"],
        "dependencies": [f"python={python}", "pip", {"pip": pip}],
    }


def build_environment(project: Path, s: Settings) -> Any:
    """An anonymous environment: base image + generated conda file. Azure ML names it by a hash
    of its content, so an unchanged pyproject.toml reuses the image built before."""
    from azure.ai.ml.entities import Environment

    return Environment(
        image=s.image,
        conda_file=conda_spec(project, str(s.python), s.pins, s.pip_extra_index_url),
        description="equip: generated from pyproject.toml by equip.launchers.azureml.jobs",
    )


# ---------------------------------------------------------------- data
def data_input(cfg: DictConfig, cwd: Path) -> tuple[str | None, Path | None]:
    """(input path, local folder) for the job's data.root; (None, None) for built-in data."""
    root = OmegaConf.select(cfg, "data.root", default=None, throw_on_missing=False)
    if root is None or cfg.data.get("kind") == "synthetic":
        return None, None
    root = str(root)
    if REMOTE_PATH.match(root):
        return root, None
    local = Path(root).expanduser()
    local = (local if local.is_absolute() else cwd / local).resolve()
    if not local.is_dir():
        raise EquipError(
            f"data.root={root}: no such folder ({local}); give a local folder to "
            "upload or an azureml:NAME:VERSION / azureml:// data path."
        )
    return str(local), local


@functools.lru_cache(maxsize=16)
def folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a folder's content: relative paths, sizes and modification times."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- command line
def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def identity_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that say what a job trains (schema.is_identity_key), sorted."""
    return sorted(o for o in overrides if schema.is_identity_key(key_of(o)))


def launch_key(overrides: Sequence[str], data: Path | str | None) -> str:
    """Identity of a job for resume: the overrides that define what it trains, and its data."""
    keep = [o for o in identity_overrides(overrides) if key_of(o) != "data.root"]
    data_id = folder_fingerprint(data) if isinstance(data, Path) else str(data or "")
    return hashlib.sha256(repr([keep, data_id]).encode()).hexdigest()[:16]


def _runs_remotely(key: str) -> bool:
    if key == "data.root":
        return False
    return not key.startswith("tracking.") or key in REMOTE_TRACKING_KEEP


def remote_arguments(cfg: DictConfig, overrides: Sequence[str], has_data: bool) -> list[str]:
    """The job's overrides as `python train.py` gets them on the cluster: minus the tracking keys
    that locate the workspace from outside, data.root as the mounted input, no progress bar."""
    args = [o for o in overrides if _runs_remotely(key_of(o))]
    if has_data:
        args.append(DATA_ARG)
    if "trainer" in cfg and "progress_bar" in cfg.trainer:
        args.append("trainer.progress_bar=false")  # logs, not a terminal
    return args


def command_line(args: Sequence[str]) -> str:
    return "python train.py " + " ".join(shlex.quote(a) for a in args)


def command_job(
    *,
    name: str,
    display: str,
    experiment: str,
    description: str,
    command: str,
    project: Path,
    environment: Any,
    s: Settings,
    data_path: str | None,
    env: dict[str, str],
    tags: dict[str, str] | None = None,
) -> Any:
    """The SDK's CommandJob (what `az ml job create --file` would read)."""
    from azure.ai.ml import Input
    from azure.ai.ml import command as command_node

    inputs = {}
    if data_path is not None:
        inputs["data"] = Input(type="uri_folder", path=data_path, mode=s.data_mode)
    node = command_node(
        name=name,
        display_name=display[: schema.MAX_RUN_NAME],
        experiment_name=experiment,
        description=description[:1000],
        command=command,
        code=str(project),
        environment=environment,
        compute=s.compute,
        inputs=inputs,
        environment_variables={"PYTHONPATH": "src", **env},
        tags=tags or {},
    )
    return node._to_job()


# ---------------------------------------------------------------- dry run
def write_job_file(j: AzureJob, path: Path) -> None:
    """The job as the YAML `az ml job create --file` takes, checked with the SDK's own schema."""
    import yaml
    from azure.ai.ml import load_job

    spec = json.loads(json.dumps(j.job._to_dict()))
    if j.local_data is not None:  # the SDK writes local paths as `azureml:<path>`
        spec["inputs"]["data"]["path"] = str(j.local_data)
    path.write_text(yaml.safe_dump(spec, sort_keys=False, width=1000))
    try:
        load_job(path)._validate().try_raise()  # offline
    except Exception as e:
        why = str(e).splitlines()[0]
        raise EquipError(
            f"job {j.idx} ({' '.join(j.overrides)}) does not pass the Azure ML job schema: {why}"
        ) from None
