"""The baseline as users get it back: the same raw-image pyfunc contract as the CNN's.

Input: a DataFrame with an `image` column of file paths or base64-encoded image bytes; the
training preprocessing (equip.data.preprocess) is applied, then the scikit-learn pipeline.
Output: `class`, `probability`, and one `p_<class>` column per class, as equip.serving's.
The pipeline itself is kept inside as an MLflow sklearn model (artifacts/pipeline), so the
sklearn flavour stays one `mlflow.sklearn.load_model` away.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from equip.serving import IMAGE_COLUMN, read_image_value


def classify_baseline(
    pipeline, classes: list[str], image_size: int, raw_images: list[bytes]
) -> pd.DataFrame:
    """Decode and preprocess exactly as in training, then score with the sklearn pipeline."""
    from PIL import Image

    from equip.baseline import predict_proba
    from equip.data import preprocess

    rows = []
    for i, raw in enumerate(raw_images):
        try:
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                rows.append(preprocess(img, image_size).reshape(-1))
        except Exception as e:
            raise ValueError(f"image {i} could not be decoded: {type(e).__name__}: {e}") from None
    probs = (predict_proba(pipeline, np.stack(rows), len(classes)) if rows
             else np.zeros((0, len(classes)), np.float32))  # fmt: skip
    out = pd.DataFrame({
        "class": [classes[i] for i in probs.argmax(1).tolist()],
        "probability": probs.max(1).astype(np.float64) if rows else [],
    })  # fmt: skip
    for j, name in enumerate(classes):
        out[f"p_{name}"] = probs[:, j].astype(np.float64)
    return out


class BaselineImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import mlflow.sklearn

        self.pipeline = mlflow.sklearn.load_model(context.artifacts["pipeline"])
        meta = context.model_config
        self.classes, self.image_size = list(meta["classes"]), int(meta["image_size"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"the input needs a column {IMAGE_COLUMN!r} (file paths or base64)")
        values = model_input[IMAGE_COLUMN].tolist()
        raw = [read_image_value(v, i) for i, v in enumerate(values)]
        return classify_baseline(self.pipeline, self.classes, self.image_size, raw)


def log_baseline_pyfunc(pipeline, classes: list[str], image_size: int) -> str:
    """Log the fitted pipeline as the run's `model`, a raw-image pyfunc; returns its URI."""
    import mlflow.sklearn
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import equip
    from equip.baseline import TRUSTED_SKLEARN_TYPES

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", "class"), ColSpec("double", "probability"),
                        *[ColSpec("double", f"p_{c}") for c in classes]]),
    )  # fmt: skip
    warnings.filterwarnings("ignore", message=".*input example was not provided.*")
    names = ["mlflow", "scikit-learn", "scikit-image", "skops", "pillow", "numpy", "pandas"]
    requirements = [f"{n}=={metadata.version(n)}" for n in names]
    with tempfile.TemporaryDirectory(prefix="equip-baseline-") as tmp:
        path = str(Path(tmp) / "pipeline")
        mlflow.sklearn.save_model(pipeline, path, skops_trusted_types=TRUSTED_SKLEARN_TYPES,
                                  pip_requirements=requirements)  # fmt: skip
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=BaselineImageModel(),
            artifacts={"pipeline": path},
            model_config={"classes": list(classes), "image_size": image_size},
            code_paths=[str(Path(equip.__file__).parent)],  # loads without equip installed
            signature=signature,
            pip_requirements=requirements,
            metadata={"classes": list(classes), "image_size": image_size},
        )
    return info.model_uri
