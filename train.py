"""Train one CNN per config (or one per point with -m) and record each in MLflow.

python train.py                                      # built-in data, local MLflow store
python train.py model.filters=[32,64],[32,64,128] -m # one parent run, one child per job
python train.py -m sweep=smoke                       # a named sweep from sweeps/
"""

import hydra
from omegaconf import DictConfig

from equip.train.cli import one_line_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from equip.train.cli import run_training  # torch/lightning/mlflow load only when a job runs

    return run_training(cfg)


if __name__ == "__main__":
    with one_line_errors():
        main()
