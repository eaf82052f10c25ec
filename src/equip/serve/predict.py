"""Classify photos with a trained model:

    python -m equip.predict model=models:/equip-gear@champion images=PATH [output=predictions.csv]
                            [runtime=auto|onnx|torch]

`model` is a registered model (models:/NAME/VERSION, or models:/NAME@champion for the version
equip tagged champion), a run (runs:/ID/model or just the run id) or a local Lightning
checkpoint (.ckpt). `images` is a file or a folder; when the folder is a class-per-folder tree
whose names are the model's classes, accuracy is printed. `runtime` runs the network on ONNX
Runtime (the model's model.onnx) or torch; auto (the default) takes ONNX Runtime where the model
has one. Options are key=value pairs (OmegaConf dotlist), like train.py's overrides.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING, OmegaConf
from rich.table import Table

from equip.errors import EquipError
from equip.serve._options import typed_options
from equip.serve.runtimes import check_runtime
from equip.terminal import fail, fail_if_refused, printed_help, report
from equip.track.refusals import store_refusal


@dataclass
class PredictOptions:
    model: str = MISSING
    images: str = MISSING
    output: str = "predictions.csv"
    tracking_uri: str | None = None
    show: int = 30  # rows of the table printed
    runtime: str = "auto"


DEFAULTS = OmegaConf.structured(PredictOptions)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
TAGGED = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


def find_images(path: Path) -> list[Path]:
    from equip.data.images import IMAGE_SUFFIXES, image_files

    if path.is_file():
        return [path]
    if not path.is_dir():
        raise EquipError(f"images={path} does not exist; give an image file or a folder.")
    files = [p for p in image_files(path)[0] if p.is_file()]  # as training reads a class folder
    if not files:
        raise EquipError(
            f"images={path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    return files


def load_predictor(model: str, runtime: str = "auto"):
    """A callable DataFrame(image=base64) -> DataFrame(class, probability, p_*); the network
    runs on `runtime` (auto, onnx or torch: equip.serve.runtimes)."""
    from equip.serve.runtimes import make_runner

    check_runtime(runtime)
    if model.endswith(".ckpt"):
        from equip.model.cnn import load_classifier
        from equip.serve.pyfunc import classify, read_image_value

        if not Path(model).is_file():
            raise EquipError(f"model={model}: no such checkpoint file.")
        run = make_runner(load_classifier(model), None, runtime)
        return lambda df: classify(run, [read_image_value(v, i) for i, v in enumerate(df.image)])
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    try:
        # Fetched once, then read: its MLmodel says which runtimes it has.
        local = mlflow.artifacts.download_artifacts(model_location(model))
        config = runtime_config(local, runtime)
        return mlflow.pyfunc.load_model(local, model_config=config).predict
    except (MlflowException, OSError) as e:
        if store_refusal(e) is not None:
            raise  # the store said no: main() says which request, in one line
        raise EquipError(
            f"model={model}: cannot load it from {mlflow.get_tracking_uri()}: "
            f"{str(e).splitlines()[0]}{_why_no_model(model)}"
        ) from None


def _why_no_model(model: str) -> str:
    """For a run's model that is not there: what the run says about it ('' otherwise)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    from equip.track import schema

    if not (RUN_ID.match(model) or model.startswith("runs:/")):
        return ""
    try:  # a runs:/ URI that does not parse is said by the error this adds to
        run_id = model if RUN_ID.match(model) else RunsArtifactRepository.parse_runs_uri(model)[0]
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return ""
    if run.info.status != "FINISHED":
        why = run.data.tags.get(schema.ERROR, "no reason recorded")
        return f" (the run ended {run.info.status}: {why}; a run logs its model once trained)"
    if run.data.params.get("tracking.log_model") == "false":
        return " (the run was trained with tracking.log_model=false: it logged no model)"
    return ""


def runtime_config(model_dir: str, runtime: str) -> dict[str, str] | None:
    """The model config that asks for `runtime`; None for the model's own default (auto) and
    for models that declare no runtime (logged before equip exported ONNX, or the baseline:
    MLflow would warn that the key is ignored), which have nothing but torch to offer."""
    from mlflow.models import Model

    from equip.serve.runtimes import pick_runtime

    if runtime == "auto":
        return None
    declared = Model.load(model_dir).flavors.get("python_function", {}).get("config") or {}
    if "runtime" not in declared:
        pick_runtime(runtime, has_onnx=False)  # runtime=onnx: one line, the model has none
        return None
    return {"runtime": runtime}


def model_location(model: str) -> str:
    """What MLflow loads for `model=`, found with requests every store answers (an Azure ML
    workspace too): a run's model is read from the run's artifact folder (loading a runs:/ URI
    makes MLflow 3 search its logged models), and models:/NAME@ALIAS is the version tagged
    equip.ALIAS=true (equip.track.champion: registries need not have aliases)."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.tracking.artifact_utils import get_artifact_uri

    from equip.track.champion import champion_uri

    if RUN_ID.match(model):
        model = f"runs:/{model}/model"
    if model.startswith("runs:/"):
        return get_artifact_uri(*RunsArtifactRepository.parse_runs_uri(model))
    tagged = TAGGED.match(model)
    if tagged:
        return champion_uri(MlflowClient(), tagged["name"], tagged["alias"])
    return model


def predict_files(predict, files: list[Path], chunk: int = 256):
    """Send the files as base64 (as a client of a served model would), a chunk at a time; an
    image that cannot be classified is named by its file."""
    import base64

    import pandas as pd
    from mlflow.exceptions import MlflowException

    parts = []
    for start in range(0, len(files), chunk):
        batch = files[start : start + chunk]
        images = [base64.b64encode(f.read_bytes()).decode() for f in batch]
        try:
            parts.append(predict(pd.DataFrame({"image": images})))
        except (ValueError, MlflowException) as e:  # serving numbers the rows of the request
            message = getattr(e, "message", str(e))
            index = re.search(r"(?:image|row) (\d+)", message)
            where = f"{batch[int(index.group(1))]}: " if index else ""
            raise EquipError(f"{where}{message}; remove or replace that file.") from None
    return pd.concat(parts, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if printed_help(args, __doc__):
        return 0
    try:
        cfg = typed_options(DEFAULTS, args, "equip.predict")
        missing = [k for k in ("model", "images") if OmegaConf.is_missing(cfg, k)]
        if missing:
            raise EquipError(f"missing {' and '.join(missing)}=...; see python -m equip.predict -h")
        check_runtime(cfg.runtime)
        if cfg.show < 0:
            raise EquipError(f"show={cfg.show}: the number of rows to print, 0 or more.")
        folder = Path(cfg.output).absolute().parent
        if not folder.is_dir():
            raise EquipError(
                f"output={cfg.output}: no folder {folder}; create it or choose another output=."
            )
        if not str(cfg.model).endswith(".ckpt"):  # a checkpoint file needs no store
            from equip.track.store import open_given

            open_given(cfg.tracking_uri, "tracking_uri", "train a model first")
        root = Path(cfg.images)
        files = find_images(root)
        predict = load_predictor(str(cfg.model), str(cfg.runtime))
        out = predict_files(predict, files)
    except EquipError as e:
        fail(str(e), 2)
    except Exception as e:
        fail_if_refused(e)
        raise
    out.insert(0, "file", [str(f) for f in files])
    classes = [c.removeprefix("p_") for c in out.columns if c.startswith("p_")]
    if root.is_dir() and all(f.parent.name in classes for f in files):
        out.insert(1, "true_class", [f.parent.name for f in files])
    out.to_csv(cfg.output, index=False)

    table = Table(title=f"{len(out)} image(s), model {cfg.model}")
    cols = ["file", *(["true_class"] if "true_class" in out else []), "class", "probability"]
    for c in cols:
        table.add_column(c, justify="right" if c == "probability" else "left")
    for _, row in out.head(cfg.show).iterrows():
        table.add_row(*[f"{row[c]:.3f}" if c == "probability" else str(row[c]) for c in cols])
    report.print(table)
    if len(out) > cfg.show:
        print(f"... {len(out) - cfg.show} more in {cfg.output}")
    if "true_class" in out:
        acc = (out["true_class"] == out["class"]).mean()
        print(f"accuracy: {acc:.4f} ({(out['true_class'] == out['class']).sum()}/{len(out)})")
    print(f"predictions written to {cfg.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
