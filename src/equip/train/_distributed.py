"""Multi-process training (trainer.strategy=ddp): which process may write, and how the other
ranks of one job are started.

Lightning's `ddp` re-runs the entry script once per extra device with LOCAL_RANK set (torchrun
and Azure ML's PyTorch distribution start every rank themselves, with RANK set). Only global
rank 0 creates the MLflow run, logs, and records failures; the other ranks load the same data,
train the same config and write nothing. What rank 0 decides at run time (which checkpoint to
resume from) reaches the others through the environment, which Lightning copies to them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

RESUME_ENV = "EQUIP_RESUME_CHECKPOINT"  # rank 0 -> other ranks: the last.ckpt to resume from
# What Lightning's launcher exports in rank 0. Left behind, the next sweep job in this process
# would take LOCAL_RANK as "started by a cluster" and wait forever for ranks nobody starts.
LAUNCHER_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "OMP_NUM_THREADS",
    RESUME_ENV,
)


def is_rank_zero() -> bool:
    """True in a plain run and in global rank 0 of a distributed one."""
    env = os.environ
    return all(int(env.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextmanager
def launcher_environment() -> Iterator[None]:
    """Around one job's fit in rank 0: what the launcher exports lasts as long as the job."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def share_resume_checkpoint(path: str | None) -> None:
    """Rank 0, before fit: the other ranks must restore the same checkpoint."""
    if path:
        os.environ[RESUME_ENV] = path
    else:
        os.environ.pop(RESUME_ENV, None)


def resume_checkpoint() -> str | None:
    """In a rank > 0: the checkpoint rank 0 resumes from."""
    return os.environ.get(RESUME_ENV) or None


def rank_command(local_rank: int) -> tuple[list[str], str]:
    """The command that starts local rank `local_rank` of the job Hydra runs now.

    Lightning's own version replays sys.argv, which in a multirun (-m) would start the whole
    sweep again in every rank; this one replays only this job's overrides, as a single run in
    the job's own output folder.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    hc = HydraConfig.get()
    overrides: Sequence[str] = list(hc.overrides.task)
    hydra_args = [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    command = [sys.executable, to_absolute_path(sys.argv[0]), *overrides, *hydra_args]
    return command, get_original_cwd()


def use_job_command() -> None:
    """Make Lightning's subprocess launcher start other ranks with `rank_command`."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = rank_command


def leave_group() -> None:
    """After fit: rank 0 evaluates and logs alone (torchmetrics would otherwise wait for the
    other ranks, which have exited), so the process group goes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
