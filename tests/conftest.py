from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# The Ctrl-C tests press Ctrl-C on the train.py they start, as a terminal would on a foreground
# job. A suite started in the background by a script (`pytest &`, nohup) inherits SIGINT ignored
# and passes that on to every child, which then trains through the Ctrl-C. exec resets a handled
# signal to its default but keeps an ignored one ignored: handling it here gives the children
# the terminal's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# The shared gear photos, beside the checkout; EQUIP_GEAR_IMAGES=PATH names them elsewhere.
GEAR = Path(os.environ.get("EQUIP_GEAR_IMAGES") or ROOT.parent / "shared" / "data" / "gear_images")
# Tiny and fast: 32 px images, 8 per class, 2 epochs.
TINY = [
    "data.image_size=32",
    "data.per_class=8",
    "data.val_fraction=0.25",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "tracking.log_onnx=false",  # seconds per training; tests of the ONNX runtime turn it on
]


# The slowest files first: the workers take a file each (--dist loadfile), and a long file that
# starts last is the suite's tail. Measured with --durations on 2 cores; the rest keep their order.
SLOWEST_FIRST = [
    "test_azureml_launcher.py",
    "test_sweeps.py",
    "test_signals.py",
    "test_scale.py",
    "test_ray.py",
    "test_faults.py",
    "test_workspace_flow.py",
    "test_registry.py",
    "test_recipe.py",
    "test_concurrency.py",
    "test_inference.py",
    "test_train.py",
    "test_secrets.py",
    "test_workspace_standin.py",
    "test_docs.py",
    "test_options.py",
    "test_app.py",
    "test_browser.py",
    "test_cache_integrity.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which would steer later tests and
    their subprocesses to an earlier test's store."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(name, None)
    yield
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(name, None)


_at_pytest_exit = atexit.register  # not train_in_process's stand-in for a process's exit


@functools.cache
def _template_store() -> Path:
    """A store MLflow itself created, once per test process: creating one runs its schema
    migrations (seconds); each test gets a copy, as real a store as any."""
    folder = Path(tempfile.mkdtemp(prefix="equip-store-template-"))
    _at_pytest_exit(shutil.rmtree, folder, True)
    db = folder / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)
    return db


def ready_store(folder: Path) -> str:
    """A new sqlite store at folder/mlflow.db (the default `tracking.uri` there); its URI.
    Tests of creating a store start without one instead."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template_store(), folder / "mlflow.db")
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new sqlite MLflow store in the test's temp dir, which is also the working dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return ready_store(tmp_path)


def make_cfg(*overrides: str, tiny: bool = True) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*(TINY if tiny else []), *overrides])


def free_port() -> int:
    """A port free now; another process may take it before it is used (see MlflowServer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HELD_PORTS: list[socket.socket] = []  # bound for the whole session, never listened on


def port_nobody_listens_on() -> int:
    """A port that refuses connections for the whole test session: it stays bound (and never
    listens) in this process, so no server started later can take it."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(held)
    return held.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with its store in `folder` (reused when the same
    folder is given again: a restarted server). It starts at once; `wait()` returns once it
    answers. A port picked here can be taken by someone else before the server binds it: then
    the server starts again on another port. A port given by the caller (a restart on the same
    address) is kept, and a taken one fails the test with the server's log."""

    ATTEMPTS = 5

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder, self.fixed_port = folder, port is not None
        self.port = port if port is not None else free_port()
        self.proc = launch_mlflow_server(self.port, folder)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout_s: float = 90) -> str:
        """The server's URI, once it answers on a port it holds itself."""
        for _ in range(self.ATTEMPTS):
            if wait_for_server(self.proc, self.port, self.folder, timeout_s):
                return self.uri
            stop_process(self.proc)
            if self.fixed_port:
                break
            self.port = free_port()
            self.proc = launch_mlflow_server(self.port, self.folder)
        log = (self.folder / "server.log").read_text()[-3000:]
        raise RuntimeError(f"no mlflow server could hold port {self.port}:\n{log}")

    def stop(self) -> None:
        stop_process(self.proc)


def start_mlflow_server(folder: Path, port: int | None = None) -> MlflowServer:
    """A started `MlflowServer` that answers (see there)."""
    server = MlflowServer(folder, port)
    server.wait()
    return server


def launch_mlflow_server(port: int, folder: Path) -> subprocess.Popen:
    """Start the server without waiting for it (it can boot while something else starts)."""
    if not (folder / "mlflow.db").exists():
        ready_store(folder)
    log = open(folder / "server.log", "a")  # noqa: SIM115  # lives as long as the server
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers die with it
        # MLflow 3's GenAI job runner (a runner and three huey consumers per server) serves
        # nothing equip asks for: four processes less to start on 2 cores.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )


def wait_for_server(proc: subprocess.Popen, port: int, folder: Path, timeout_s: float) -> bool:
    """True once the server answers on `port` and the listening socket is its own; False if it
    could not hold the port (it exited, or another process answers there). Raises with its log
    if it neither answers nor exits in time."""
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return listener_is_in_tree(port, proc.pid)
        except OSError:
            if proc.poll() is not None:
                return False
            if time.time() > deadline:
                stop_process(proc)
                log = (folder / "server.log").read_text()[-3000:]
                raise RuntimeError(f"mlflow server on {port} did not answer:\n{log}") from None
            time.sleep(0.3)


def listener_is_in_tree(port: int, root_pid: int) -> bool:
    """Whether the socket listening on 127.0.0.1:port belongs to root_pid or its children."""
    try:
        root = psutil.Process(root_pid)
        tree = {root_pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return False
    listeners = {
        c.pid
        for c in psutil.net_connections("tcp4")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    return bool(listeners) and listeners <= tree


def stop_process(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 with its own temp store; yields its URI."""
    server = start_mlflow_server(tmp_path / "server")
    yield server.uri
    server.stop()


def freeze_when(
    proc: subprocess.Popen, wanted: Callable[[], T | None], what: str, timeout_s: float = 300
) -> T:
    """Stop `proc` (SIGSTOP) and look for the wanted state while it cannot move on; return what
    `wanted()` found, with `proc` still stopped, so that the test acts on exactly that state.
    Otherwise `proc` continues for a moment and is looked at again. Fails the test (and kills
    `proc`) if it ends, or if the state is not seen within timeout_s. `wanted()` may raise (a
    store being created, or locked by the stopped writer): that is "not yet"."""
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"ended (exit {proc.returncode}) before {what}: {_tail(proc)}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout_s:.0f} s: {_tail(proc)}")
        proc.send_signal(signal.SIGSTOP)
        try:
            found = wanted()
        except Exception:
            found = None
        if found is not None and found is not False:
            return found
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.2)


def _tail(proc: subprocess.Popen) -> str:
    proc.wait(timeout=60)
    err = proc.stderr.read() if proc.stderr else ""
    return err[-3000:]


# ---------------------------------------------------------------- shared helpers
def artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def write_pngs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    from equip.data.synthetic import make_synthetic

    images, _ = make_synthetic(1, 48, seed=5)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        files.append(folder / f"{i}.png")
        Image.fromarray(images[i].transpose(1, 2, 0)).save(files[-1])
    return files


@functools.cache
def _train_entry_point():
    """train.py itself, imported as a module (its Hydra main and the one-line error handler)."""
    spec = importlib.util.spec_from_file_location("equip_train_entry_point", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Hydra finds conf/ beside the file of a task function from __main__ (a script), but looks
    # for a Python package `conf` for one from an imported module: it must look like the script.
    module.main.__wrapped__.__module__ = "__main__"
    return module


def train_in_process(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python train.py ARGS` run the way `__main__` runs it, in this process: its exit status
    and what it prints, without an interpreter start and ~3 s of imports per call. For commands
    that end before training (bad input); signals and launchers need a real process."""
    from hydra.core.global_hydra import GlobalHydra

    from equip.train.cli import one_line_errors

    argv = [str(ROOT / "train.py"), *args]
    out, err = io.StringIO(), io.StringIO()
    handlers, level = logging.root.handlers[:], logging.root.level  # Hydra configures logging
    at_exit: list[Callable[[], object]] = []  # what the process would run as it exits
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atexit, "register", lambda f, *a, **k: at_exit.append(partial(f, *a, **k)))
        mp.chdir(cwd)
        mp.setattr(sys, "argv", argv)
        mp.setenv("HYDRA_FULL_ERROR", "0")  # one_line_errors sets it; restored afterwards
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        try:
            with (
                contextlib.redirect_stdout(out),
                contextlib.redirect_stderr(err),
                one_line_errors(),
            ):
                _train_entry_point().main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                for exit_hook in reversed(at_exit):
                    exit_hook()
            GlobalHydra.instance().clear()
            for handler in logging.root.handlers[:]:
                if handler not in handlers:
                    logging.root.removeHandler(handler)
                    handler.close()
            logging.root.handlers[:], logging.root.level = handlers, level
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_cli(
    *args: str, cwd: Path, tiny: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess (TINY first: synthetic-data sizes); no tracking
    URI from this process's environment, only what `env` adds."""
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *(TINY if tiny else []), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


FAST = [*TINY, "tracking.log_model=false"]


def sweep(*args: str, cwd: Path, env_uri: str | None = None, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if env_uri:
        env["MLFLOW_TRACKING_URI"] = env_uri
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, *args]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def sweep_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python train.py -m FAST ARGS` in this process (see train_in_process): Hydra's real
    multirun, sweeper and launcher, without an interpreter start."""
    return train_in_process(["-m", *FAST, *args], cwd)


def parent_and_children(client: MlflowClient):
    [parent] = client.search_runs(["1"], "tags.`equip.sweep_key` != ''")
    children = client.search_runs(
        ["1"],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return parent, children


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """The stand-in Azure ML workspace (tests/workspace_standin.py), one for the session (its
    mlflow server takes seconds to start); tests leave it signed in and serving.
    EQUIP_STANDIN_ENFORCE=0: it serves what it refuses (after logging it), so that one run
    lists every request a real workspace would refuse."""
    from tests.workspace_standin import Workspace

    enforce = os.environ.get("EQUIP_STANDIN_ENFORCE", "1") != "0"
    standin = Workspace.start(tmp_path_factory.mktemp("workspace"), enforce)
    yield standin
    standin.stop()


def open_when_created(db: Path) -> MlflowClient | None:
    """A client of the sqlite store a subprocess is creating, once it is whole (equip's own
    lock: a client opened while MLflow builds the tables would migrate them a second time)."""
    from equip.track.store import open_store

    if not db.exists():
        return None
    open_store(f"sqlite:///{db}", create=False)
    return MlflowClient(f"sqlite:///{db}")


# More epochs than any test waits for and no early stopping: a job still trains whenever the
# test acts on it.
ENDLESS = ["trainer.max_epochs=100000", "trainer.patience=0"]


def ctrl_c_a_training_sweep(cwd: Path, *args: str, jobs: int = 1, timeout_s: float = 300):
    """`python train.py -m … ENDLESS` in a session of its own; once `jobs` children have each
    logged an epoch, SIGINT to its whole process group, as a terminal's Ctrl-C. Returns the
    finished process, its stderr, the store's client and the processes it had started."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, "data.per_class=24"]
    log = cwd / "sweep.err"  # a file, not a pipe: a full pipe would stop the sweep mid-write
    with open(log, "w") as err_file:
        proc = subprocess.Popen(
            [*cmd, *ENDLESS, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,
        )
    deadline, client, training, started = time.time() + timeout_s, None, [], []
    try:
        while len(training) < jobs:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"no {jobs} job(s) training: {log.read_text()[-3000:]}")
            time.sleep(0.3)
            with contextlib.suppress(Exception):  # the store is being created
                client = client or open_when_created(cwd / "mlflow.db")
                running = client.search_runs(
                    ["1"], "attributes.status = 'RUNNING' and tags.mlflow.parentRunId != ''"
                )
                history = client.get_metric_history
                training = [r for r in running if history(r.info.run_id, "val_acc")]
        started = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:  # the test fails: nothing of the endless sweep may outlive it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            gone_within(started, timeout_s=0)  # Ray's workers are in process groups of their own
    return proc, log.read_text(), client, started


def gone_within(processes: list[psutil.Process], timeout_s: float = 30) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) after up to timeout_s; those are then
    killed, so that a failing test leaves no endless job training through the rest of the suite
    (seen once: two Ray workers of a failed Ctrl-C test)."""
    deadline = time.time() + timeout_s
    while True:
        alive = [p for p in processes if _alive(p)]
        if not alive or time.time() > deadline:
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            return alive
        time.sleep(0.5)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
