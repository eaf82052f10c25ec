"""The honest-CV table (issue 17): paired cross-validation on the near-duplicate-aware folds of
`data=folder` (data.group_by's default) for the baseline, the Lab05 CNN, the current recipe
(experiment=gear) and each recipe step added to it alone; each row's mean paired difference
(and its standard error) against the baseline and against the recipe.

Every row is a real `python train.py -m sweep=cv ...` into the MLflow store; finished rows are
read back from the store (by their config's CV key, as a final fit finds its CV), so the same
command again trains only what is missing, and an interrupted row resumes at its next fold.

    python bench/honest_cv.py                                   # gear photos, 128 px, 5 folds
    nice -n 10 python bench/honest_cv.py --image-size 64 --epochs 20 --folds 3 \\
        --rows baseline,gear,swa                                # a smaller scale, some rows
    python bench/honest_cv.py --data synthetic --image-size 16 --epochs 1 --folds 2 \\
        --rows baseline,lab05 --set model.filters=[4,8] --dry-run   # what it would train
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEAR = os.environ.get("EQUIP_GEAR_IMAGES") or ROOT.parent / "shared" / "data" / "gear_images"
# Each row's overrides on top of experiment=gear; the steps are the issue's candidates.
ROWS: dict[str, list[str]] = {
    "baseline": ["model=baseline"],
    "lab05": ["model=cnn"],
    "gear": [],
    # the recipe before the 10-minute budget: 128 px, 60 epochs (1.96x the training)
    "gear_128px_60ep": ["data.image_size=128", "trainer.max_epochs=60"],
    "gear_96px": ["data.image_size=96"],  # 0.73x the pixels
    "trivialaugment": ["data.augment.policy=trivialaugment"],
    "randaugment": ["data.augment.policy=randaugment"],
    "mixup": ["data.augment.mix=mixup", "data.augment.mix_alpha=0.2"],
    "cutmix": ["data.augment.mix=cutmix", "data.augment.mix_alpha=1.0"],
    "swa": ["trainer.swa_lrs=0.0003", "trainer.swa_epoch_start=0.75"],
    "multiscale_tta": ["model.tta=multiscale_hflip"],
}
METRIC = "best_val_acc"


def base_overrides(args: argparse.Namespace) -> list[str]:
    """What every row shares: the preset, the data, the scale and the folds."""
    data = (
        ["data=synthetic", f"data.per_class={args.per_class}"]
        if args.data == "synthetic"
        else [f"data.root={Path(args.root).resolve()}"]
    )
    quiet = ["trainer.progress_bar=false", "tracking.log_model=false"]  # a score, not a model
    out = ["experiment=gear", *data, f"data.folds={args.folds}", *quiet]
    if args.image_size:
        out.append(f"data.image_size={args.image_size}")
    if args.epochs:
        out.append(f"trainer.max_epochs={args.epochs}")
    if args.tracking_uri:
        out.append(f"tracking.uri={args.tracking_uri}")
    return out


def row_overrides(name: str, base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """A row's overrides; --set's model.* keys are the CNN's, so the baseline skips them."""
    baseline = name == "baseline"
    return [*base, *ROWS[name], *(o for o in extra if not (baseline and o.startswith("model.")))]


def finished_cv(overrides: Sequence[str]):
    """(the row's complete CV in the store or None, its composed fold-0 config)."""
    from hydra import compose, initialize_config_dir
    from mlflow import MlflowClient

    from equip.config.schema import register
    from equip.data.images import load_images
    from equip.sweep.context import cv_key
    from equip.sweep.crossval import config_cv
    from equip.track.store import connect, experiment_id

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "data.fold=0"])
    connect(cfg.tracking)
    key = cv_key(cfg, load_images(cfg.data).fingerprint)
    return config_cv(MlflowClient(), experiment_id(cfg.tracking), key, METRIC), cfg


def train_row(overrides: Sequence[str], folds: int) -> None:
    """The row's CV sweep, as a user would run it (a resumed sweep skips finished folds)."""
    fold_list = ",".join(str(k) for k in range(folds))
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "sweep=cv", *overrides]
    subprocess.run([*cmd, f"data.fold={fold_list}"], check=True)


def paired(row, reference) -> str:
    """'+0.012 (0.004)': the mean paired difference row - reference and its standard error."""
    from equip.sweep.crossval import paired_difference

    if row is None or reference is None or row.folds_key != reference.folds_key:
        return ""
    d = paired_difference(row, reference)
    return f"{d['mean_diff']:+.4f} ({d['se']:.4f})"


def table(results: Mapping[str, object], seconds: Mapping[str, float | None]) -> list[str]:
    """The printed rows: mean ± sd of the folds, paired differences, training time per fold."""
    import statistics

    base, gear = results.get("baseline"), results.get("gear")
    lines = [f"{'row':<16}{'val_acc mean ± sd':>20}{'vs baseline':>18}{'vs gear':>18}{'s/fold':>8}"]
    for name, cv in results.items():
        if cv is None:
            lines.append(f"{name:<16}{'not trained':>20}")
            continue
        scores = list(cv.scores.values())
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        time = seconds.get(name)
        lines.append(
            f"{name:<16}{f'{cv.mean:.4f} ± {sd:.4f}':>20}"
            f"{paired(cv, base) if name != 'baseline' else '':>18}"
            f"{paired(cv, gear) if name != 'gear' else '':>18}"
            f"{'' if time is None else f'{time:.1f}':>8}"
        )
    return lines


def fold_seconds(cv) -> float | None:
    from mlflow import MlflowClient

    return MlflowClient().get_run(cv.parent_id).data.metrics.get("cv_mean_train_time_s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    base = base_overrides(args)
    results, seconds = {}, {}
    for name in args.rows:
        overrides = row_overrides(name, base, args.set)
        cv, _ = finished_cv(overrides)
        if cv is None:
            print(
                f"{name}: to train: python train.py -m sweep=cv {' '.join(overrides)}", flush=True
            )
            if not args.dry_run:
                train_row(overrides, args.folds)
                cv, _ = finished_cv(overrides)
        else:
            print(f"{name}: finished (CV parent {cv.parent_id}), read from the store", flush=True)
        results[name] = cv
        seconds[name] = fold_seconds(cv) if cv is not None else None
    print(f"\n{args.folds}-fold CV, {' '.join(base)}; mean paired difference (standard error)")
    print("\n".join(table(results, seconds)))
    return 0


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("folder", "synthetic"), default="folder")
    p.add_argument("--root", default=str(GEAR), help="class-per-folder photos (data=folder)")
    p.add_argument("--per-class", type=int, default=20, help="images per class (synthetic)")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--rows", default=",".join(ROWS), help=f"any of {','.join(ROWS)}")
    p.add_argument("--set", nargs="*", default=[], help="more overrides (model.*: CNN rows)")
    p.add_argument("--tracking-uri", default=None, help="default: train.py's (./mlflow.db)")
    p.add_argument("--dry-run", action="store_true", help="list what would train, train nothing")
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {','.join(unknown)}; choose from {','.join(ROWS)}")
    return args


if __name__ == "__main__":
    raise SystemExit(main())
