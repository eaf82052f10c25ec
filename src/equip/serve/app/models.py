"""The model the app serves: loaded from a model URI, described (name, version, run, where to
see the run), and replaced when the registry crowns another champion.

`models:/NAME@ALIAS` (the default, `models:/equip-gear@champion`) follows the champion: the
version tagged `equip.ALIAS=true` (equip.track.champion), looked up again on `ModelHolder.reload`
(every `reload_s` seconds, and on `POST /reload`). Any other URI (models:/NAME/VERSION, runs:/…,
a run id) names one fixed model, which is never reloaded.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from equip.errors import EquipError
from equip.serve.predict import RUN_ID, TAGGED, model_location
from equip.terminal import say
from equip.track.record import UI_TRAINING_VIEW
from equip.track.redaction import strip_secrets

Predict = Callable[[Any], Any]  # DataFrame(image=base64) -> DataFrame(class, probability, p_*)


@dataclass(frozen=True)
class ServedModel:
    """One loaded model and what the page shows about it; never changed once built."""

    uri: str  # as asked for, e.g. models:/equip-gear@champion
    location: str  # what was loaded, e.g. models:/equip-gear/3
    predict: Predict = field(repr=False)
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    classes: list[str] = field(default_factory=list)
    image_size: int | None = None
    runtime: str | None = None
    run_link: dict[str, str] = field(default_factory=dict)  # {"url"} or {"command", "url"}

    def describe(self) -> dict[str, Any]:
        """GET /model: what a client needs to know about the model, without the callable."""
        return {
            "uri": self.uri,
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "classes": self.classes,
            "image_size": self.image_size,
            "runtime": self.runtime,
            "run_link": self.run_link,
            "follows_champion": follows_champion(self.uri),
        }


def follows_champion(uri: str) -> bool:
    return TAGGED.match(uri) is not None


def first_line(error: BaseException) -> str:
    """An error in one line for the server's log, secrets cut out."""
    return strip_secrets((str(error).strip().splitlines() or [type(error).__name__])[0])[:300]


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> dict[str, str]:
    """Where the run is seen in the MLflow UI: a link on an MLflow server; for a local store,
    the command that opens the UI on it and the page to open there."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?{UI_TRAINING_VIEW}"  # not GenAI
    if tracking_uri.startswith(("http://", "https://")):
        return {"url": f"{strip_secrets(tracking_uri).rstrip('/')}/{page}"}
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        command = f"mlflow ui --backend-store-uri {tracking_uri}"
        return {"command": command, "url": f"http://127.0.0.1:5000/{page}"}
    return {}  # e.g. an Azure ML workspace: its studio shows the run


def identify(uri: str) -> tuple[str, str | None, str | None, str | None]:
    """(what to load, registered name, version, run id) of a model URI, with requests every
    store answers (see equip.serve.predict.model_location)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    location = model_location(uri)
    if location.startswith("models:/"):
        name, _, version = location.removeprefix("models:/").partition("/")
        if version.isdigit():
            return location, name, version, client.get_model_version(name, version).run_id
        return location, name, None, None
    run = uri.removeprefix("runs:/").split("/")[0]
    return location, None, None, run if RUN_ID.match(run) else None


def load(uri: str) -> ServedModel:
    """Load the model `uri` names from the current tracking store; EquipError in one line when
    it cannot be loaded."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from equip.track.refusals import store_refusal

    if uri.endswith(".ckpt"):
        raise EquipError(f"model={uri}: the app serves MLflow models; give a run or models:/…")
    try:
        location, name, version, run_id = identify(uri)
        model = mlflow.pyfunc.load_model(location)
    except (MlflowException, OSError) as e:
        if store_refusal(e) is not None:
            raise  # the store said no: the command says which request, in one line
        where = strip_secrets(mlflow.get_tracking_uri())
        raise EquipError(
            f"model={uri}: cannot load it from {where}: {str(e).splitlines()[0]}"
        ) from None
    meta = model.metadata.metadata or {}
    return ServedModel(
        uri=uri,
        location=location,
        predict=model.predict,
        name=name,
        version=version,
        run_id=run_id,
        classes=[str(c) for c in meta.get("classes") or []],
        image_size=int(meta["image_size"]) if meta.get("image_size") else None,
        runtime=_runtime_of(model),
        run_link=_link_of(run_id),
    )


def _runtime_of(model: Any) -> str | None:
    """What runs the network (onnx or torch), when the model says: the runner of equip's CNN
    pyfunc (equip.serve.runtimes)."""
    try:
        runtime = getattr(getattr(model.unwrap_python_model(), "runner", None), "name", None)
    except Exception:  # not a Python model: MLflow does not say what runs it
        return None
    return str(runtime) if runtime else None


def _link_of(run_id: str | None) -> dict[str, str]:
    import mlflow
    from mlflow import MlflowClient

    if run_id is None:
        return {}
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    return run_link(mlflow.get_tracking_uri(), experiment_id, run_id)


class ModelHolder:
    """The served model behind one reference: a reload builds the new model beside the old one
    and then swaps the reference, so a request in flight finishes on the model it took."""

    def __init__(self, uri: str, loader: Callable[[str], ServedModel] = load) -> None:
        self.uri, self._load = uri, loader
        self.current = loader(uri)
        self._reloading = threading.Lock()  # one reload at a time (poller and POST /reload)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def reload(self) -> bool:
        """Serve the champion as the registry has it now; True when that is a new version.
        A fixed model URI is not reloaded (False)."""
        if not follows_champion(self.uri):
            return False
        with self._reloading:
            location, *_ = identify(self.uri)
            if location == self.current.location:
                return False
            self.current = self._load(self.uri)
            if gc.get_freeze_count():  # the command froze the replaced model: free its cycles
                gc.unfreeze()
                gc.collect()
                gc.freeze()
        say(f"equip app: now serving {self.current.location} (the new {self.uri})")
        return True

    def poll(self, every_s: float) -> None:
        """Reload in a background thread every `every_s` seconds (0: never). A failed look-up
        leaves the current model served and is said in one line."""
        if every_s <= 0 or not follows_champion(self.uri):
            return
        self._poller = threading.Thread(
            target=self._poll_loop, args=(every_s,), name="equip-app-reload", daemon=True
        )
        self._poller.start()

    def _poll_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.reload()
            except Exception as e:  # the store went away for a while: keep serving, try again
                say(f"equip app: could not look up {self.uri}: {first_line(e)}")

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
