"""The Azure ML settings, written once: `launch.*` (`+launch=azureml`, one run) and
`hydra.launcher.*` (`hydra/launcher=azureml`, a sweep) are these dataclasses, registered in
Hydra's ConfigStore (`register_configs`, called by the plugin package when Hydra starts) and
extended by conf/launch/azureml.yaml and conf/hydra/launcher/azureml.yaml. Hydra checks their
types when it composes; `check_settings` checks the rest before the SDK is touched.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from typing import Any, Self

from omegaconf import DictConfig, OmegaConf

from equip.errors import EquipError
from equip.track import store

SCHEMA_GROUP = "schema/azureml"  # where the YAMLs find these: /schema/azureml/{run,launcher}
LAUNCHER_TARGET = "hydra_plugins.equip_azureml_launcher.AzureMLLauncher"
DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"  # curated base
# Azure ML compute names: a letter first, then letters, digits and hyphens (clusters allow
# 2-16 characters, compute instances up to 24); checked here so a typo fails before any upload.
COMPUTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,23}$")


@dataclass
class RunSettings:
    """One Azure ML command job (`launch.*`); a sweep's jobs take the same settings."""

    compute: str | None = None  # required: an existing compute cluster of the workspace
    dry_run: bool = False  # true: build, validate and write <job>.azureml.yaml; submit nothing
    image: str = DEFAULT_IMAGE
    python: str | None = None  # Python of the job environment; null: the one running here
    pins: str = "pyproject"  # pyproject: the dependency specifiers; installed: versions here
    pip_extra_index_url: str | None = None  # e.g. https://download.pytorch.org/whl/cpu
    # Azure ML experiment of the jobs; null: tracking.experiment for a run (the job's run is
    # the training run), <tracking.experiment>-jobs for a sweep's jobs.
    experiment_name: str | None = None
    data_mode: str = "ro_mount"  # how the job sees the data input (ro_mount or download)
    poll_s: float = 20.0  # seconds between status checks

    @classmethod
    def of(cls, values: Any) -> Self:
        """From a config node or mapping, ready to use: unknown keys (Hydra's _target_) are
        ignored, `python` defaults to this interpreter's version."""
        if isinstance(values, DictConfig):
            values = OmegaConf.to_container(values, resolve=True)
        known = {f.name for f in dataclasses.fields(cls)} - {"_target_"}
        s = cls(**{k: v for k, v in dict(values).items() if k in known})
        s.python = s.python or f"{sys.version_info.major}.{sys.version_info.minor}"
        s.dry_run, s.poll_s = bool(s.dry_run), float(s.poll_s)
        return s


@dataclass
class LauncherSettings(RunSettings):
    """`hydra/launcher=azureml`: every job of a sweep as a command job (`hydra.launcher.*`)."""

    _target_: str = LAUNCHER_TARGET
    max_concurrent: int = 4  # jobs submitted at once (Optuna: also set hydra.sweeper.n_jobs)

    @classmethod
    def of(cls, values: Any) -> Self:
        s = super().of(values)
        s.max_concurrent = max(1, int(s.max_concurrent))
        return s


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group=SCHEMA_GROUP, name="run", node=RunSettings, provider="equip")
    cs.store(group=SCHEMA_GROUP, name="launcher", node=LauncherSettings, provider="equip")


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
    store.workspace_of(config.tracking)  # names the missing keys
