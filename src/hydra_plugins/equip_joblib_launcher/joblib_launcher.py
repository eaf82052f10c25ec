"""The Hydra plugin class behind `hydra/launcher=joblib` (conf/hydra/launcher/joblib.yaml)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


class EquipJoblibLauncher(JoblibLauncher):
    """Hydra's joblib launcher (its settings and set-up), with equip's scheduling of the jobs
    over worker processes: see equip.launchers.processes."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from equip.launchers.processes import launch  # loky, mlflow: only when a sweep runs

        return launch(self, job_overrides, initial_job_idx)
