"""The classical-ML baseline the CNN has to beat: scikit-learn on hand-made features.

It trains on the very tensors (same preprocessing, same split) the CNN sees, and its pipeline
starts from raw uint8 pixels, so the logged sklearn model needs nothing but images.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from equip.data.images import ImageSet

# Types skops would refuse to load back: our feature function, and the random forest's trees.
# Both come from this very process, so the saved model is trusted.
TRUSTED_SKLEARN_TYPES = ["equip.model.baseline.image_features", "sklearn.tree._tree.Tree"]


def image_features(
    flat: np.ndarray, image_size: int, features: Sequence[str], pixels_size: int
) -> np.ndarray:
    """(N, 3*S*S) uint8 images, flattened -> (N, F) float features."""
    from PIL import Image
    from skimage.feature import hog

    images = flat.reshape(-1, 3, image_size, image_size).transpose(0, 2, 3, 1).astype(np.uint8)
    rows = []
    for im in images:
        parts = []
        if "pixels" in features:
            small = Image.fromarray(im).resize((pixels_size, pixels_size), Image.Resampling.BOX)
            parts.append(np.asarray(small, np.float32).ravel() / 255)
        if "hog" in features:
            cell = max(image_size // 8, 2)
            grey = im.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            parts.append(
                hog(
                    grey,
                    orientations=9,
                    pixels_per_cell=(cell, cell),
                    cells_per_block=(2, 2),
                    feature_vector=True,
                )
            )
        if "color_hist" in features:
            parts += [
                np.histogram(im[..., c], bins=16, range=(0, 256))[0] / im[..., c].size
                for c in range(3)
            ]
        rows.append(np.concatenate(parts).astype(np.float32))
    return np.stack(rows)


def build_pipeline(m: Mapping[str, Any], image_size: int, seed: int, n_jobs: int = 1) -> Pipeline:
    featurize = FunctionTransformer(
        image_features,
        kw_args={
            "image_size": image_size,
            "features": list(m["features"]),
            "pixels_size": m["pixels_size"],
        },
    )
    estimator: BaseEstimator
    if m["estimator"] == "logreg":
        from sklearn.linear_model import LogisticRegression

        estimator = LogisticRegression(C=m["C"], max_iter=3000, random_state=seed)
        return make_pipeline(featurize, StandardScaler(), estimator)
    if m["estimator"] == "svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        # Platt-scaled probabilities, as SVC(probability=True) gave (deprecated in scikit-learn 1.9)
        svm = CalibratedClassifierCV(SVC(C=m["C"], random_state=seed), ensemble=False)
        return make_pipeline(featurize, StandardScaler(), svm)
    from sklearn.ensemble import RandomForestClassifier

    estimator = RandomForestClassifier(m["n_estimators"], n_jobs=n_jobs, random_state=seed)
    return make_pipeline(featurize, estimator)


def fit_baseline(
    m: Mapping[str, Any],
    x_train: np.ndarray,
    y_train: np.ndarray,
    image_size: int,
    seed: int,
    n_jobs: int = 1,
) -> tuple[Pipeline, float]:
    """Fit on flattened uint8 images; returns the pipeline and the fit time in seconds."""
    pipeline = build_pipeline(m, image_size, seed, n_jobs)
    if m["estimator"] == "svm":  # each calibration fold needs every class: at most its image count
        fewest = int(np.unique(y_train, return_counts=True)[1].min())
        pipeline.set_params(calibratedclassifiercv__cv=max(2, min(5, fewest)))
    t0 = time.perf_counter()
    pipeline.fit(x_train, y_train)
    return pipeline, time.perf_counter() - t0


def check_calibration_folds(y_train: np.ndarray, classes: Sequence[str]) -> None:
    """The svm's probabilities are calibrated on held-out folds of the training images, and
    each fold needs every class: a class with a single training image cannot be split."""
    from equip.errors import EquipError

    present, counts = np.unique(y_train, return_counts=True)
    single = [classes[c] for c, n in zip(present, counts, strict=True) if n < 2]
    if single:
        raise EquipError(
            "model.estimator=svm calibrates its probabilities on at least 2 folds of the "
            f"training images, but class {', '.join(map(repr, single))} has a single training "
            "image; add photos of it, lower data.val_fraction, or use model.estimator=logreg."
        )


def predict_proba(pipeline: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities with one column per class, even for classes unseen in training."""
    proba = pipeline.predict_proba(x)
    full = np.zeros((len(x), n_classes), np.float32)
    full[:, pipeline.classes_] = proba
    return full


def fit_and_log(
    cfg: DictConfig, images: ImageSet, split: np.ndarray, run_id: str, parallel_jobs: int = 1
) -> dict[str, Any]:
    """The baseline's side of equip.train.run.train(): fit, evaluate and log like a CNN run."""
    import torch

    from equip.runtime import cpu_count
    from equip.track import record as tracking
    from equip.track import reports

    def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(split == name)
        return images.images[idx].reshape(len(idx), -1).numpy(), images.labels[idx].numpy()

    x_train, y_train = flat("train")
    if cfg.model.estimator == "svm":
        check_calibration_folds(y_train, images.classes)
    n_jobs = max(1, cpu_count() // max(parallel_jobs, 1))  # share cores with parallel jobs
    pipeline, fit_time = fit_baseline(
        cfg.model, x_train, y_train, cfg.data.image_size, cfg.seed, n_jobs
    )
    n = len(images.classes)
    x_val, y_val = flat("val")
    probs = torch.from_numpy(predict_proba(pipeline, x_val, n))
    final = {
        "train_time_s": fit_time,
        "epochs_trained": 1,
        "train_acc": float((pipeline.predict(x_train) == y_train).mean()),
    }
    if (split == "test").any():
        x_test, y_test = flat("test")
        final["test_acc"] = float((pipeline.predict(x_test) == y_test).mean())
    final = reports.log_evaluation(run_id, images.classes, torch.from_numpy(y_val), probs, final, 0)
    # The per-epoch names too, so baseline and CNN runs sort side by side in the MLflow UI.
    tracking.log_metrics(
        run_id,
        {k.removeprefix("best_"): v for k, v in final.items() if k.startswith("best_val_")},
        step=0,
    )
    # The caller logs the pipeline as a raw-image pyfunc (equip.serve.baseline_pyfunc).
    return {"metrics": final, "pipeline": pipeline}
