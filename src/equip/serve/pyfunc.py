"""The model as users get it back: an MLflow pyfunc that takes raw images, not tensors.

Input: a DataFrame with an `image` column of base64-encoded image bytes (file paths only where
allowed, see below). The training preprocessing (equip.data.images) is applied, so a photo
goes in as it is. Output: `class`, `probability`, and one `p_<class>` column per class.

A served model must not read its server's disk for a client: file paths are refused unless an
image root is set through MLflow's model config (`model_config={"image_root": "/folder"}` at
load time, or MLFLOW_PYFUNC_INFERENCE_CONFIG='{"image_root": "/folder"}' for `mlflow models
serve`), and then only paths under it are read.
Requests are bounded (rows, bytes, pixels) and every refusal is one line with no server detail.

The network runs on ONNX Runtime (the model's model.onnx) or torch: `runtime` in the same model
config, auto (the default), onnx or torch; see equip.serve.runtimes.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

IMAGE_COLUMN = "image"
MAX_ROWS = 512  # images per request
MAX_IMAGE_BYTES = 20 * 2**20  # one encoded image
MAX_PIXELS = 40_000_000  # one decoded image (width x height): a 40 MP photo, not a PNG bomb


class BadImageInput(ValueError):
    """A client's mistake: answered as one line (HTTP 400 when served), no server detail."""


def read_image_value(value: Any, row: int, image_root: str | None = None) -> bytes:
    """Base64 text (or raw bytes; or a path under `image_root`) -> the image file's bytes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    text = str(value)
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise BadImageInput(f"row {row}: image larger than {MAX_IMAGE_BYTES // 2**20} MB")
    if image_root and len(text) < 4096:
        path, root = Path(text).resolve(), Path(image_root).resolve()
        if path.is_relative_to(root) and path.is_file():
            return path.read_bytes()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        where = (
            " nor a file under the allowed image root"
            if image_root
            else (" (file paths are off for this model)")
        )
        raise BadImageInput(f"row {row}: not base64-encoded image bytes{where}") from None


def decode_images(raw_images: Sequence[bytes], image_size: int) -> np.ndarray:
    """Encoded images -> (N, 3, S, S) uint8, preprocessed exactly as in training; the pixel
    bound is checked from each header before anything is decoded."""
    from PIL import Image

    from equip.data.images import preprocess

    arrays = []
    for i, raw in enumerate(raw_images):
        try:
            with Image.open(io.BytesIO(raw)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadImageInput(
                        f"image {i} has {img.width}x{img.height} pixels; at most "
                        f"{MAX_PIXELS // 10**6} MP are accepted"
                    )
                img.load()
                arrays.append(preprocess(img, image_size))
        except BadImageInput:
            raise
        except Exception as e:
            raise BadImageInput(
                f"image {i} could not be decoded as an image ({type(e).__name__})"
            ) from None
    return np.stack(arrays) if arrays else np.zeros((0, 3, image_size, image_size), np.uint8)


def as_frame(classes: Sequence[str], probs: np.ndarray) -> pd.DataFrame:
    """The output contract of every equip model: class, probability, p_<class>. Built in one
    constructor call: adding the columns one by one cost more than the network for one photo."""
    probs = probs.astype(np.float64).reshape(len(probs), len(classes))
    columns: dict[str, Any] = {
        "class": [classes[i] for i in probs.argmax(1).tolist()],
        "probability": probs.max(1, initial=0.0),
    }
    columns.update({f"p_{name}": probs[:, j] for j, name in enumerate(classes)})
    return pd.DataFrame(columns)


def classify(model, raw_images: Sequence[bytes], batch_size: int = 64) -> pd.DataFrame:
    """Decode and preprocess exactly as in training, then classify. `model` is a runner of
    equip.serve.runtimes (ONNX Runtime or torch) or a Classifier (run on torch)."""
    from equip.serve.runtimes import TorchRunner

    runner = model if hasattr(model, "probabilities") else TorchRunner(model)
    x = decode_images(raw_images, runner.image_size)
    probs = [runner.probabilities(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return as_frame(
        runner.classes,
        np.concatenate(probs) if probs else np.zeros((0, len(runner.classes)), np.float32),
    )


def read_images(model_input: pd.DataFrame, image_root: str | None) -> list[bytes]:
    """The request's images, checked for shape and size before anything is decoded."""
    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        raise BadImageInput(f"the input needs a column {IMAGE_COLUMN!r} of base64-encoded images")
    values = model_input[IMAGE_COLUMN].tolist()
    if len(values) > MAX_ROWS:
        raise BadImageInput(f"{len(values)} images in one request; send at most {MAX_ROWS}")
    return [read_image_value(v, i, image_root) for i, v in enumerate(values)]


def as_client_error(error: BadImageInput) -> Exception:
    """MLflow's scoring server answers an MlflowException with its message and a 400, without
    the server's traceback (any other exception is answered with the traceback)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE)


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from equip.model.cnn import load_classifier
        from equip.serve.request_limit import serve_with_request_limit
        from equip.serve.runtimes import make_runner

        serve_with_request_limit()  # mlflow models serve: an oversized body is never read
        config = context.model_config or {}
        self.model = load_classifier(context.artifacts["checkpoint"])
        self.runner = make_runner(self.model, context.artifacts.get("onnx"), config.get("runtime"))
        self.image_root = config.get("image_root") or None

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return classify(self.runner, read_images(model_input, self.image_root))
        except BadImageInput as e:
            raise as_client_error(e) from None


def _requirements() -> list[str]:
    """Pinned to what trained the model; inferring them would re-import the model (slow)."""
    names = [
        "mlflow",
        "torch",
        "torchvision",
        "pytorch-lightning",
        "torchmetrics",
        "pillow",
        "numpy",
        "pandas",
        "omegaconf",
        "onnx",
        "onnxruntime",
    ]
    return [f"{n}=={metadata.version(n)}" for n in names]


def model_signature(classes: Sequence[str]) -> ModelSignature:
    """What both pyfuncs (CNN and baseline) take and give: an image column in; the class, its
    probability and one p_<class> column per class out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", "class"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", f"p_{c}") for c in classes]
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]), outputs=Schema(outputs))


MODEL_FOLDER = "model"  # the run's artifact folder that holds its MLflow model
# MLflow's models-from-code files (a file that calls mlflow.models.set_model): a model object
# would be saved with CloudPickle, which MLflow warns about (unpickling runs code) on every save.
CNN_MODEL_CODE = Path(__file__).with_name("_cnn_model.py")


def log_run_model(python_model: str | Path, run_id: str | None = None, **save_kwargs: Any) -> str:
    """Save a pyfunc (equip's code inside) as the `model` artifacts of run `run_id` (default:
    the active run); returns runs:/RUN_ID/model. `python_model` is a models-from-code file.

    Not mlflow.pyfunc.log_model: in MLflow 3 that makes a logged model (create_logged_model,
    and registering or loading it searches logged models), APIs an Azure ML workspace does not
    list as supported. A model folder among the run's artifacts is registered from its runs:/
    URI and loaded from the version's source on every store."""
    from mlflow.models import Model

    import equip

    # No input_example: it would need a real photo, and MLflow warns about its absence.
    warnings.filterwarnings("ignore", message=".*input example was not provided.*")
    run_id = run_id or mlflow.active_run().info.run_id
    with tempfile.TemporaryDirectory(prefix="equip-model-") as tmp:
        path = Path(tmp) / MODEL_FOLDER
        mlflow.pyfunc.save_model(
            path,
            python_model=str(python_model),
            mlflow_model=Model(artifact_path=MODEL_FOLDER, run_id=run_id),
            code_paths=[str(Path(equip.__file__).parent)],  # loads without equip installed
            **save_kwargs,
        )
        mlflow.MlflowClient().log_artifacts(run_id, str(path), MODEL_FOLDER)
    return f"runs:/{run_id}/{MODEL_FOLDER}"


def log_pyfunc(checkpoint: str, classes: list[str], image_size: int, onnx: bool = True) -> str:
    """Log the checkpoint as the run's `model` (a pyfunc), with the network exported to ONNX
    beside it (artifacts/model.onnx; its spec in the metadata); returns its model URI."""
    artifacts = {"checkpoint": checkpoint}
    metadata: dict[str, Any] = {"classes": classes, "image_size": image_size}
    with tempfile.TemporaryDirectory(prefix="equip-onnx-") as tmp:
        spec = export_beside(checkpoint, Path(tmp) / "model.onnx") if onnx else None
        if spec is not None:
            artifacts["onnx"], metadata["onnx"] = str(Path(tmp) / "model.onnx"), spec
        return log_run_model(
            CNN_MODEL_CODE,
            artifacts=artifacts,
            signature=model_signature(classes),
            pip_requirements=_requirements(),
            metadata=metadata,
            # declared, so a load or a server can set them
            model_config={"image_root": "", "runtime": "auto"},
        )


def export_beside(checkpoint: str, path: Path) -> dict[str, Any] | None:
    """The checkpoint's network as ONNX at `path`; its spec, or None (and one warning line)
    when it cannot be exported: the model is then logged for torch alone."""
    import logging

    from equip.model.cnn import load_classifier
    from equip.serve.onnx_export import export_onnx

    try:
        return export_onnx(load_classifier(checkpoint), path)
    except Exception as e:  # an exporter gap must not fail a finished training
        message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        logging.getLogger(__name__).warning(
            f"no model.onnx: the network could not be exported ({type(e).__name__}: {message}); "
            "the model runs on torch"
        )
        return None
