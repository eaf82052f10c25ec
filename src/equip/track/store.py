"""Where runs go: the MLflow store, checked before any work, with bounded retries when it
goes away, and runs of crashed processes (`_processes`) marked KILLED by the next command that
opens it. An Azure ML workspace's URI is read by `_azureml`. A local sqlite store is created
under a file lock beside it, and a sweep holds a lock of its own while it runs (`_lock`).

    sqlite:///mlflow.db (default), http(s)://HOST:PORT (an mlflow server), azureml://… (a
    workspace; tracking=azureml), or any other URI MLflow knows.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from equip.errors import EquipError, StoreUnavailable
from equip.track import schema
from equip.track._azureml import azureml_uri, require_azure_extra
from equip.track._azureml import workspace_of as workspace_of  # re-exported: launchers use it
from equip.track._http import move_credentials_to_environment, reachable, set_retries
from equip.track._http import store_is_down as store_is_down  # re-exported: train.cli asks it
from equip.track._lock import OwnedLock as OwnedLock  # re-exported: a sweep holds one
from equip.track._lock import exclusive
from equip.track._processes import process_tags as process_tags  # re-exported: every run
from equip.track._processes import reap_stale_runs
from equip.track.redaction import strip_secrets

# The user's own setting, read before mlflow.set_tracking_uri() exports its choice to the
# environment (it does, for child processes): later runs in this process must not mistake it.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
STORE_LOCK_WAIT_S = 300  # creating or migrating a store takes seconds; longer means a hang
SCHEMES = (
    "sqlite",
    "http",
    "https",
    "file",
    "azureml",
    "databricks",
    "postgresql",
    "mysql",
    "mssql",
)


def resolve_uri(tracking: DictConfig) -> str:
    """MLFLOW_TRACKING_URI wins (Azure ML jobs inject it); a relative sqlite path is made absolute
    against the launch directory so every job of a sweep writes to the same store."""
    uri = USER_TRACKING_URI or tracking.uri
    if not uri and tracking.get("kind") == "azureml":
        uri = azureml_uri(tracking)
    uri = str(uri or "")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def default_uri() -> str:
    """For commands without a config (report, predict): the environment's store, else the
    default local one in this folder, as train.py would use."""
    return resolve_uri(OmegaConf.create({"uri": "sqlite:///mlflow.db"}))


def open_given(uri: str | None, key: str, first: str) -> str:
    """The store a command without a config reads (predict, the app, the leaderboard): `uri`
    from its command line (`key` names that option), else the environment's or ./mlflow.db.
    Refused in one line when it cannot be read (an unknown scheme, no such sqlite file: do
    `first`; a server that does not answer), else opened and made MLflow's; its URI."""
    import mlflow

    where = key if uri or not USER_TRACKING_URI else "MLFLOW_TRACKING_URI"
    uri = uri or default_uri()
    scheme = _known_scheme(uri, where)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise EquipError(f"no MLflow store at {uri}: {first}, or give {key}=URI.")
    if scheme == "azureml":
        require_azure_extra()
    elif scheme in ("http", "https"):
        uri = move_credentials_to_environment(uri)
        if not reachable(uri, timeout=5):
            raise StoreUnavailable(
                f"the MLflow server {uri} is unreachable ({where}): start it or give another "
                f"{key}=URI."
            )
    open_store(uri, create=False)  # waits while another command creates it
    mlflow.set_tracking_uri(uri)
    return uri


def _where(uri: str) -> str:
    """Which setting the URI came from, for messages."""
    return "MLFLOW_TRACKING_URI" if USER_TRACKING_URI else "tracking.uri"


def connect(tracking: DictConfig) -> str:
    """Point MLflow at the store, checked first (see check_store)."""
    import mlflow

    uri = check_store(tracking)
    open_store(uri, create=False)  # a new store is made by its first use (experiment_id)
    mlflow.set_tracking_uri(uri)
    return uri


def open_store(uri: str, create: bool = True) -> None:
    """Open a local sqlite store once, under its lock: MLflow creates or migrates the schema on
    a process's first touch with no lock of its own, so two commands starting together on a new
    store collide (`duplicate column name`) and can leave it half-migrated for good. MLflow
    caches the opened store for the process. create=False: only a store that exists (one being
    created meanwhile is waited for). Other stores: nothing to do."""
    if not uri.startswith("sqlite:///"):
        return
    from mlflow import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    if not create and not db.exists():
        return
    with exclusive(_store_lock_file(db), STORE_LOCK_WAIT_S, f"the store {db}"):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EquipError(
                f"{_where(uri)}={uri}: MLflow cannot open {db} ({reason[:300]}). An old store: "
                f"run `mlflow db upgrade {uri}`; one whose creation was cut off: move it aside."
            ) from None


def sweep_lock(uri: str, key: str) -> OwnedLock:
    """The lock one sweep (`key`: its identity) holds while it runs against the store at `uri`:
    beside a sqlite store (in .cache/equip/sweep-locks/ of its folder), else in the user's cache."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return OwnedLock(db.parent / ".cache" / "equip" / "sweep-locks" / f"{db.name}.{key}.lock")
    import hashlib

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    store_id = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return OwnedLock(cache / "equip" / "sweep-locks" / f"{store_id}.{key}.lock")


def _store_lock_file(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


def check_store(tracking: DictConfig) -> str:
    """Fail in seconds, with a fix, when the store cannot be used (no mlflow import: cheap).
    Returns the URI without credentials (they travel in MLflow's environment variables)."""
    uri = resolve_uri(tracking)
    if not uri:
        raise EquipError(
            "tracking.uri is empty: use sqlite:///mlflow.db, http://HOST:PORT or tracking=azureml."
        )
    scheme = _known_scheme(uri, _where(uri))
    if scheme == "azureml":
        require_azure_extra()
    elif scheme in ("http", "https"):
        uri = move_credentials_to_environment(uri)
        set_retries(float(tracking.get("outage_s", 120)))
        if not reachable(uri, timeout=5):
            raise StoreUnavailable(
                f"MLflow tracking server {uri} is unreachable. Start it (mlflow server --host "
                f"127.0.0.1 --port 5000), fix {_where(uri)}, or unset it to log to the local "
                "sqlite store."
            )
    elif scheme == "sqlite":
        _check_sqlite(uri)
    if scheme in ("sqlite", "file", "") and tracking.get("artifact_root"):
        _check_folder(Path(tracking.artifact_root), "tracking.artifact_root")
    return uri


def _known_scheme(uri: str, where: str) -> str:
    """The URI's scheme, one MLflow can use, else refused naming the setting it came from."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme and scheme not in SCHEMES and len(scheme) > 1:  # (C:\ is a Windows path)
        raise EquipError(
            f"{where}={strip_secrets(uri)}: unknown scheme {scheme!r}; use "
            "sqlite:///PATH.db, http(s)://HOST:PORT or a folder."
        )
    return scheme


def _check_sqlite(uri: str) -> None:
    if not uri.startswith("sqlite:///") or uri == "sqlite:///":
        raise EquipError(
            f"{_where(uri)}={uri} is not a sqlite URI MLflow can open: use "
            "sqlite:///relative/path.db or sqlite:////absolute/path.db."
        )
    db = Path(uri.removeprefix("sqlite:///"))
    _check_folder(db.parent, _where(uri))
    if db.is_dir():
        raise EquipError(f"{_where(uri)}={uri}: {db} is a folder; name a .db file.")
    if db.exists():
        with open(db, "rb") as f:
            header = f.read(16)
        if header and header != b"SQLite format 3\x00":
            raise EquipError(
                f"{_where(uri)}={uri}: {db} is not a sqlite database; pick another file name."
            )
        return
    # Creatable? (sqlite would only say 'unable to open database file', after retries.) Probed
    # with the store's lock file, which is kept: a probe of the db itself could delete the
    # store another command is creating at this moment.
    try:
        _store_lock_file(db).touch()
    except OSError as e:
        raise EquipError(
            f"{_where(uri)}={uri}: cannot create {db} ({e.strerror}); choose a writable folder."
        ) from None


def _check_folder(folder: Path, key: str) -> None:
    """The folder exists or can be made, and is writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise EquipError(
            f"{key}: {folder} is not a folder (a file is in the way); choose another location."
        ) from None
    except OSError as e:
        raise EquipError(
            f"{key}: cannot create the folder {folder} ({e.strerror}); choose a writable location."
        ) from None
    if not os.access(folder, os.W_OK):
        raise EquipError(f"{key}: folder {folder} is not writable; choose another location.")


def experiment_id(tracking: DictConfig) -> str:
    """Get or create the experiment (local stores keep artifacts under `artifact_root`), and
    mark the runs of crashed processes in it KILLED."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    open_store(mlflow.get_tracking_uri())  # the first use of a new local store creates it
    name, artifact_root = tracking.experiment, tracking.get("artifact_root")
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if schema.EXPERIMENT_KIND not in exp.tags:  # made before equip tagged it, or by hand
            # Only how UIs label it: a store refusing the tag must not stop a run (the next
            # request reports a store that is down).
            with contextlib.suppress(MlflowException):
                client.set_experiment_tag(
                    exp.experiment_id, schema.EXPERIMENT_KIND, schema.MODEL_TRAINING
                )
        reap_stale_runs(exp.experiment_id, float(tracking.get("stale_after_s", 1800)))
        return exp.experiment_id
    location = None
    if artifact_root and client.tracking_uri.startswith(("sqlite:", "file:", "/")):
        location = (Path(artifact_root).resolve() / name).as_uri()
    kind = {schema.EXPERIMENT_KIND: schema.MODEL_TRAINING}
    try:
        return client.create_experiment(name, artifact_location=location, tags=kind)
    except MlflowException:  # a parallel job created it first
        return client.get_experiment_by_name(name).experiment_id
