"""The model as users get it back: an MLflow pyfunc that takes raw images, not tensors.

Input: a DataFrame with an `image` column of file paths or base64-encoded image bytes. The
training preprocessing (equip.data.preprocess) is applied, so a photo goes in as it is.
Output: `class`, `probability`, and one `p_<class>` column per class.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

IMAGE_COLUMN = "image"


def read_image_value(value: Any, row: int) -> bytes:
    """A path or base64 text (or raw bytes) -> the image file's bytes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    text = str(value)
    if len(text) < 4096 and os.path.isfile(text):
        return Path(text).read_bytes()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"row {row} of column {IMAGE_COLUMN!r} is neither an existing file path nor "
            "base64-encoded image bytes"
        ) from None


def classify(model, raw_images: Sequence[bytes], batch_size: int = 64) -> pd.DataFrame:
    """Decode and preprocess exactly as in training, then classify. `model` is a Classifier."""
    import torch
    from PIL import Image

    from equip.data import preprocess

    arrays = []
    for i, raw in enumerate(raw_images):
        try:
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                arrays.append(preprocess(img, model.image_size))
        except Exception as e:
            raise ValueError(f"image {i} could not be decoded: {type(e).__name__}: {e}") from None
    x = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, 3, 1, 1)
    with torch.inference_mode():
        probs = torch.cat(
            [model(x[i : i + batch_size]).softmax(1) for i in range(0, len(x), batch_size)]
        ) if len(x) else torch.empty(0, len(model.classes))  # fmt: skip
    best = probs.argmax(1) if len(x) else torch.empty(0, dtype=torch.long)
    out = pd.DataFrame({
        "class": [model.classes[i] for i in best.tolist()],
        "probability": probs.max(1).values.numpy() if len(x) else [],
    })  # fmt: skip
    for j, name in enumerate(model.classes):
        out[f"p_{name}"] = probs[:, j].numpy()
    return out


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from equip.model import Classifier

        path = context.artifacts["checkpoint"]
        self.model = Classifier.load_from_checkpoint(path, map_location="cpu").eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"the input needs a column {IMAGE_COLUMN!r} (file paths or base64)")
        values = model_input[IMAGE_COLUMN].tolist()
        return classify(self.model, [read_image_value(v, i) for i, v in enumerate(values)])


def _requirements() -> list[str]:
    """Pinned to what trained the model; inferring them would re-import the model (slow)."""
    names = ["mlflow", "torch", "torchvision", "pytorch-lightning", "torchmetrics", "pillow",
             "numpy", "pandas", "omegaconf"]  # fmt: skip
    return [f"{n}=={metadata.version(n)}" for n in names]


def log_pyfunc(checkpoint: str, classes: list[str], image_size: int) -> str:
    """Log the checkpoint as the run's `model` (a pyfunc); returns its model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import equip

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", "class"), ColSpec("double", "probability"),
                        *[ColSpec("double", f"p_{c}") for c in classes]]),
    )  # fmt: skip
    # No input_example: it would need a real photo, and MLflow warns about its absence.
    warnings.filterwarnings("ignore", message=".*input example was not provided.*")
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=ImageClassifierModel(),
        artifacts={"checkpoint": checkpoint},
        code_paths=[str(Path(equip.__file__).parent)],  # the model loads without equip installed
        signature=signature,
        pip_requirements=_requirements(),
        metadata={"classes": classes, "image_size": image_size},
    )
    return info.model_uri
