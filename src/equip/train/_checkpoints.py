"""Where a CNN run's checkpoints live, and for how long.

best.ckpt (by trainer.monitor) and last.ckpt (resume=) are written to the run's own folder under
data.cache_dir, kept after a failure so `resume=` can continue from last.ckpt; without a cache
folder they go to a temporary one. Once the run FINISHED the folder goes: best.ckpt is in the run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from equip.track import schema

LAST = "last.ckpt"


def checkpoint_dir(cfg: DictConfig, run_id: str) -> Path:
    """Where a run's best.ckpt and last.ckpt live while it trains."""
    return Path(cfg.data.cache_dir).expanduser().resolve() / "runs" / run_id


def model_checkpoint(cfg: DictConfig, dirpath: Path) -> ModelCheckpoint:
    """best.ckpt by trainer.monitor and last.ckpt (resume=); a final fit has no score to watch."""
    t = cfg.trainer
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="best",
        save_top_k=1,
        save_last=True,
        monitor=None if cfg.final_fit else str(t.monitor),  # a plain str in the checkpoint
        mode=schema.monitor_mode(t.monitor),
    )


class CheckpointFolder:
    """A run's checkpoint folder as a context manager: `open(run_id)` makes it once the run
    exists; leaving removes it, unless a failed run can be resumed from its last.ckpt."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.path: Path | None = None
        self.checkpoint: ModelCheckpoint | None = None

    def open(self, run_id: str) -> ModelCheckpoint:
        if self.cfg.data.cache_dir:  # kept until the run FINISHES: resume= continues from it
            self.path = checkpoint_dir(self.cfg, run_id)
        else:
            self.path = Path(tempfile.mkdtemp(prefix="equip-ckpt-"))
        self.checkpoint = model_checkpoint(self.cfg, self.path)
        return self.checkpoint

    def best(self) -> str | None:
        """The best checkpoint so far (a failed run keeps it)."""
        return self.checkpoint.best_model_path if self.checkpoint is not None else None

    def last(self) -> str:
        """The checkpoint a resumed run continues from."""
        assert self.path is not None, "open() the folder first"
        return str(self.path / LAST)

    def __enter__(self) -> CheckpointFolder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.path is None:
            return
        resumable = (
            error is not None and bool(self.cfg.data.cache_dir) and (self.path / LAST).exists()
        )
        if not resumable:  # FINISHED (best.ckpt is in the run), or nothing resume= could use
            shutil.rmtree(self.path, ignore_errors=True)
