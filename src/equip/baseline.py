"""The classical-ML baseline the CNN has to beat: scikit-learn on hand-made features.

It trains on the very tensors (same preprocessing, same split) the CNN sees, and its pipeline
starts from raw uint8 pixels, so the logged sklearn model needs nothing but images.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from equip.errors import EquipError

FEATURES = ("pixels", "hog", "color_hist")
ESTIMATORS = ("logreg", "random_forest", "svm")


def check_baseline(m: Mapping[str, Any]) -> None:
    if m["estimator"] not in ESTIMATORS:
        raise EquipError(f"model.estimator={m['estimator']!r} is not one of: "
                         f"{', '.join(ESTIMATORS)}.")  # fmt: skip
    unknown = [f for f in m["features"] if f not in FEATURES]
    if unknown or not m["features"]:
        raise EquipError(f"model.features={list(m['features'])}: use a non-empty list of "
                         f"{', '.join(FEATURES)}.")  # fmt: skip
    if m["pixels_size"] < 2 or m["C"] <= 0 or m["n_estimators"] < 1:
        raise EquipError("model.pixels_size must be >= 2, model.C > 0, model.n_estimators >= 1.")


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
            parts.append(hog(grey, orientations=9, pixels_per_cell=(cell, cell),
                             cells_per_block=(2, 2), feature_vector=True))  # fmt: skip
        if "color_hist" in features:
            parts += [np.histogram(im[..., c], bins=16, range=(0, 256))[0] / im[..., c].size
                      for c in range(3)]  # fmt: skip
        rows.append(np.concatenate(parts).astype(np.float32))
    return np.stack(rows)


def build_pipeline(m: Mapping[str, Any], image_size: int, seed: int) -> Pipeline:
    featurize = FunctionTransformer(
        image_features,
        kw_args={"image_size": image_size, "features": list(m["features"]),
                 "pixels_size": m["pixels_size"]},
    )  # fmt: skip
    estimator: BaseEstimator
    if m["estimator"] == "logreg":
        from sklearn.linear_model import LogisticRegression

        estimator = LogisticRegression(C=m["C"], max_iter=3000, random_state=seed)
        return make_pipeline(featurize, StandardScaler(), estimator)
    if m["estimator"] == "svm":
        from sklearn.svm import SVC

        return make_pipeline(featurize, StandardScaler(),
                             SVC(C=m["C"], probability=True, random_state=seed))  # fmt: skip
    from sklearn.ensemble import RandomForestClassifier

    from equip.runtime import cpu_count, parallel_jobs

    n_jobs = max(1, cpu_count() // parallel_jobs())  # share the cores with parallel sweep jobs
    estimator = RandomForestClassifier(m["n_estimators"], n_jobs=n_jobs, random_state=seed)
    return make_pipeline(featurize, estimator)


def fit_baseline(
    m: Mapping[str, Any], x_train: np.ndarray, y_train: np.ndarray, image_size: int, seed: int
) -> tuple[Pipeline, float]:
    """Fit on flattened uint8 images; returns the pipeline and the fit time in seconds."""
    pipeline = build_pipeline(m, image_size, seed)
    t0 = time.perf_counter()
    pipeline.fit(x_train, y_train)
    return pipeline, time.perf_counter() - t0


def predict_proba(pipeline: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities with one column per class, even for classes unseen in training."""
    proba = pipeline.predict_proba(x)
    full = np.zeros((len(x), n_classes), np.float32)
    full[:, pipeline.classes_] = proba
    return full
