"""Test-time augmentation by paired CV without training again (issue 17): each fold model of a
finished honest-CV row (bench/honest_cv.py) re-scores its own val fold with every `model.tta`.

TTA changes only how a trained model predicts, so the fold models `sweep=cv` already trained
and logged (their checkpoint and data/split.csv) give the paired comparison in minutes, on the
very folds the row was scored on. The row's own setting is re-scored too, and must reproduce
the accuracy the run logged: a check that the images and the model are the ones it validated.

    python bench/tta_folds.py --tracking-uri sqlite:///mlflow.db          # the gear row
    python bench/tta_folds.py --root /path/to/gear_images --rows gear,gear_96px
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import honest_cv  # noqa: E402  # the rows, their overrides and their CV in the store

TTAS = ("none", "hflip", "multiscale", "multiscale_hflip")


def fold_files(client, run_id: str, keep: str, into: Path) -> tuple[Path, dict[str, str]]:
    """The fold model it validated (trainer.keep) and its split (path -> train/val)."""
    ckpt = "checkpoints/final.ckpt" if keep == "last" else "checkpoints/best.ckpt"
    local = Path(client.download_artifacts(run_id, ckpt, str(into)))
    split_csv = Path(client.download_artifacts(run_id, "data/split.csv", str(into)))
    with split_csv.open() as f:
        split = {row["path"]: row["split"] for row in csv.DictReader(f)}
    return local, split


def val_accuracy(model, images, labels, batch: int = 64) -> float:
    import torch

    right = 0
    with torch.inference_mode():
        for i in range(0, len(labels), batch):
            pred = model(images[i : i + batch]).argmax(1)
            right += int((pred == labels[i : i + batch]).sum())
    return right / len(labels)


def score_row(name: str, overrides: Sequence[str], ttas: Sequence[str]) -> dict[str, list[float]]:
    """{tta: per-fold val accuracy}, plus 'logged': what each fold run logged."""
    import torch
    from mlflow import MlflowClient

    from equip.data.images import load_images
    from equip.model.cnn import load_classifier

    cv, cfg = honest_cv.finished_cv(overrides)
    if cv is None:
        raise SystemExit(f"{name}: no finished CV in the store; run bench/honest_cv.py first")
    images = load_images(cfg.data)
    index = {p: i for i, p in enumerate(images.paths)}
    client = MlflowClient()
    out: dict[str, list[float]] = {"logged": [], **{t: [] for t in ttas}}
    for fold in sorted(cv.run_ids):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, split = fold_files(client, cv.run_ids[fold], cfg.trainer.keep, Path(tmp))
            model = load_classifier(str(ckpt))
        val = [index[p] for p, s in split.items() if s == "val"]
        x, y = images.images[val], images.labels[torch.tensor(val)]
        out["logged"].append(cv.scores[fold])
        for tta in ttas:
            model.tta = tta
            out[tta].append(val_accuracy(model, x, y))
        trained = model.hparams["model"]["tta"]
        if trained in out and abs(out[trained][-1] - cv.scores[fold]) > 0.5 / len(val):
            raise SystemExit(
                f"{name} fold {fold}: tta={trained} re-scores {out[trained][-1]:.4f}, the run "
                f"logged {cv.scores[fold]:.4f}: not the images or the model it validated"
            )
        scored = ", ".join(f"{t} {out[t][-1]:.4f}" for t in ("logged", *ttas))
        print(f"{name} fold {fold} ({len(val)} photos, tta={trained}): {scored}", flush=True)
    return out


def paired(a: Sequence[float], b: Sequence[float]) -> str:
    """'+0.002 (0.001)': fold-by-fold a - b, paired and printed as bench/honest_cv.py does."""
    from equip.sweep.crossval import CvResult

    def folds(scores: Sequence[float]) -> CvResult:
        return CvResult("", dict(enumerate(scores)), {}, len(scores), "")

    return honest_cv.paired(folds(a), folds(b))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    base = honest_cv.base_overrides(args)
    for name in args.rows:
        overrides = honest_cv.row_overrides(name, base, args.set)
        scores = score_row(name, overrides, args.tta)
        logged = scores["logged"]
        print(
            f"\n{name}: val accuracy by model.tta over {len(logged)} folds; "
            "mean paired difference (standard error) against what the runs logged"
        )
        for tta in ("logged", *args.tta):
            s = scores[tta]
            sd = statistics.stdev(s) if len(s) > 1 else 0.0
            vs = paired(s, logged) if tta != "logged" else ""
            print(f"  {tta:<18}{statistics.mean(s):.4f} ± {sd:.4f}{vs:>18}")
    return 0


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("folder", "synthetic"), default="folder")
    p.add_argument("--root", default=str(honest_cv.GEAR), help="class-per-folder photos")
    p.add_argument("--per-class", type=int, default=20, help="images per class (synthetic)")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--rows", default="gear", help="finished CNN rows of bench/honest_cv.py")
    p.add_argument("--tta", default=",".join(TTAS), help=f"any of {','.join(TTAS)}")
    p.add_argument("--set", nargs="*", default=[], help="the row's extra overrides, as there")
    p.add_argument("--tracking-uri", default=None, help="default: train.py's (./mlflow.db)")
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    args.tta = [t for t in args.tta.split(",") if t]
    bad = [r for r in args.rows if r not in honest_cv.ROWS or r == "baseline"]
    if bad:
        p.error(f"--rows: {','.join(bad)} is not a CNN row of bench/honest_cv.py")
    return args


if __name__ == "__main__":
    raise SystemExit(main())
