"""The Hydra plugin class behind `hydra/launcher=ray` (conf/hydra/launcher/ray.yaml)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class RayLauncher(Launcher):
    """Runs each job of a Hydra sweep as a Ray task; see equip.launchers.ray.launcher."""

    def __init__(self, ray: DictConfig, **_: Any) -> None:
        self.ray_cfg = ray
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from equip.launchers.ray.launcher import (
            launch,  # ray, mlflow: only when a sweep is launched
        )

        assert self.config and self.hydra_context and self.task_function
        # The settings are read from self.config.hydra.launcher.ray, like the callback does.
        return launch(
            self.config, self.hydra_context, self.task_function, job_overrides, initial_job_idx
        )
