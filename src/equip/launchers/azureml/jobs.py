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
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from equip.errors import EquipError
from equip.launchers.azureml.settings import RunSettings
from equip.track import schema

# Of the tracking.* overrides a job keeps only these: the rest locate the workspace from outside
# (a job logs through the MLflow URI Azure ML injects), and data.root becomes the data input.
REMOTE_TRACKING_KEEP = ("tracking.experiment", "tracking.log_model", "tracking.log_onnx")
LAUNCHER_ONLY = {"azure-ai-ml"}  # in the `azure` extra for the launcher; jobs do not need it
REMOTE_PATH = re.compile(r"^(azureml:|https://|wasbs://|abfss://|adl://)")
JOB_TAG = "equip.azureml_job"  # tag of the child run: the Azure ML job that trained it
KEY_TAG = "equip.launch_key"  # tag of the child run: its overrides and data, for resume
DATA_ARG = "data.root=${{inputs.data}}"  # the mounted input, substituted by Azure ML


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


def build_environment(project: Path, s: RunSettings) -> Any:
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
    s: RunSettings,
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
