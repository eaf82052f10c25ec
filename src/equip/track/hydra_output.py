"""Secrets kept out of the files Hydra writes: `.hydra/{config,hydra,overrides}.yaml` of every
job and `multirun.yaml` (and Optuna's `optimization_results.yaml`) of a sweep.

Hydra writes them itself with every value in clear and offers no hook to change what it writes,
so `RedactHydraFiles`, a Hydra callback (conf/train.yaml `hydra.callbacks`), rewrites them right
after: a job's `.hydra/` files exist when `on_job_start` runs (hydra.core.utils.run_job saves them
just before calling it); the sweeper saves `multirun.yaml` after `on_multirun_start`, before the
first job, so each job's `on_job_start` (in-process or in a joblib worker) rewrites it too, and
`on_multirun_end` once more. Hydra's log lines are redacted by equip.track.redaction.SecretFilter
(conf/hydra/job_logging, conf/hydra/hydra_logging).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from equip.track.redaction import redact_text, redact_tree

log = logging.getLogger(__name__)
SAVED_CONFIGS = ("config.yaml", "hydra.yaml", "overrides.yaml")
SWEEP_FILES = ("multirun.yaml", "optimization_results.yaml")


def redact_yaml_file(path: Path) -> None:
    """Rewrite one YAML file with its secrets redacted; atomic, so that parallel jobs rewriting
    the same multirun.yaml never leave it half-written. Unchanged files are left alone."""
    if not path.is_file():
        return
    text = path.read_text()
    tree = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    # Override lists such as hydra.overrides.task hold `key=value` strings: redact_text.
    redacted = OmegaConf.to_yaml(OmegaConf.create(redact_tree(tree, text=redact_text)))
    if redacted == OmegaConf.to_yaml(OmegaConf.create(tree)):
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(redacted)
    os.chmod(tmp, path.stat().st_mode)  # Hydra's file mode, not mkstemp's 0600
    os.replace(tmp, path)


def _redact_files(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = folder / name
        try:
            redact_yaml_file(path)
        except Exception as e:  # the job goes on, but without a record that may hold secrets
            path.unlink(missing_ok=True)
            log.warning("removed %s: could not redact it (%s)", path, type(e).__name__)


class RedactHydraFiles(Callback):
    """Rewrites the configs Hydra saved for a run, a sweep job or a sweep with secrets as ***."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = config.hydra
        if hydra.output_subdir is not None:
            _redact_files(Path(hydra.runtime.output_dir) / hydra.output_subdir, SAVED_CONFIGS)
        if hydra.mode == RunMode.MULTIRUN:
            _redact_files(Path(str(hydra.sweep.dir)), SWEEP_FILES)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _redact_files(Path(str(config.hydra.sweep.dir)), SWEEP_FILES)
