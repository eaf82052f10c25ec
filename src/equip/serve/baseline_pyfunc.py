"""The baseline as users get it back: the same raw-image pyfunc contract as the CNN's.

Input: a DataFrame with an `image` column of base64-encoded image bytes (file paths only under
an allowed root, as for the CNN: see `pyfunc`); the training preprocessing is applied, then
the scikit-learn pipeline. Output: `class`, `probability`, and one `p_<class>` column per class.
The pipeline itself is kept inside as an MLflow sklearn model (artifacts/pipeline), so the
sklearn flavour stays one `mlflow.sklearn.load_model` away.
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from equip.serve.pyfunc import (
    BadImageInput,
    as_client_error,
    as_frame,
    decode_images,
    log_run_model,
    model_signature,
    read_images,
)


def classify_baseline(
    pipeline, classes: list[str], image_size: int, raw_images: list[bytes]
) -> pd.DataFrame:
    """Decode and preprocess exactly as in training, then score with the sklearn pipeline."""
    from equip.model.baseline import predict_proba

    x = decode_images(raw_images, image_size).reshape(len(raw_images), -1)
    probs = (
        predict_proba(pipeline, x, len(classes))
        if len(x)
        else np.zeros((0, len(classes)), np.float32)
    )
    return as_frame(classes, probs)


class BaselineImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import mlflow.sklearn

        from equip.serve.request_limit import serve_with_request_limit

        serve_with_request_limit()  # mlflow models serve: an oversized body is never read

        self.pipeline = mlflow.sklearn.load_model(context.artifacts["pipeline"])
        meta = context.model_config
        self.classes, self.image_size = list(meta["classes"]), int(meta["image_size"])
        self.image_root = meta.get("image_root") or None  # file paths: see equip.serve.pyfunc

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            raw = read_images(model_input, self.image_root)
            return classify_baseline(self.pipeline, self.classes, self.image_size, raw)
        except BadImageInput as e:
            raise as_client_error(e) from None


def log_baseline_pyfunc(pipeline, classes: list[str], image_size: int) -> str:
    """Log the fitted pipeline as the run's `model`, a raw-image pyfunc; returns its URI."""
    import mlflow.sklearn

    from equip.model.baseline import TRUSTED_SKLEARN_TYPES

    names = ["mlflow", "scikit-learn", "scikit-image", "skops", "pillow", "numpy", "pandas"]
    requirements = [f"{n}=={metadata.version(n)}" for n in names]
    with tempfile.TemporaryDirectory(prefix="equip-baseline-") as tmp:
        path = str(Path(tmp) / "pipeline")
        mlflow.sklearn.save_model(
            pipeline, path, skops_trusted_types=TRUSTED_SKLEARN_TYPES, pip_requirements=requirements
        )
        return log_run_model(
            Path(__file__).with_name("_baseline_model.py"),  # models from code: no CloudPickle
            artifacts={"pipeline": path},
            model_config={"classes": list(classes), "image_size": image_size, "image_root": ""},
            signature=model_signature(classes),
            pip_requirements=requirements,
            metadata={"classes": list(classes), "image_size": image_size},
        )
