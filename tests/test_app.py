"""The photo app (`python -m equip.app`): the page in a real headless Chromium, the JSON API's
refusals, two clients at once, and a new champion served without a restart. One tiny CNN is
trained and registered once for the module, in a real sqlite store; the app runs on uvicorn
in this process, on a port the OS picks."""

from __future__ import annotations

import base64
import functools
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient

from equip.cli import main as cli_main
from equip.serve.app.api import create_app
from equip.serve.app.command import main as app_main
from equip.serve.app.models import ModelHolder, run_link
from equip.serve.app.server import AppServer, bind
from equip.serve.predict import load_predictor, predict_files
from equip.track import champion, schema
from equip.train.run import train
from tests.conftest import GEAR, ROOT, make_cfg, ready_store, write_pngs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NAME = "app"  # the registered model of this module
TINY_CNN = [
    "data.image_size=16",
    "data.per_class=4",
    "data.val_fraction=0.25",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
]
MB = 2**20


@dataclass(frozen=True)
class Registered:
    uri: str  # the sqlite store
    folder: Path
    run_id: str


@dataclass(frozen=True)
class RunningApp:
    url: str


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """One tiny CNN on the built-in data, registered as version 1 and champion of `app`."""
    folder = tmp_path_factory.mktemp("app-store")
    uri = ready_store(folder)
    overrides = [
        "registry.enabled=true",
        "registry.require_baseline=false",
        f"registry.name={NAME}",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # tracking.uri: sqlite:///mlflow.db here
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = train(make_cfg(*TINY_CNN, *overrides, tiny=False), overrides)
    assert result["registry"]["champion"], result["registry"]
    return Registered(uri, folder, result["run_id"])


@pytest.fixture(scope="module")
def app(registered: Registered):
    """`equip app` (the console script's command) in a process of its own, following the
    champion of `app`, on a port the OS picks; Ctrl-C ends it with exit code 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI": registered.uri}
    args = [sys.executable, "-m", "equip.cli", "app", f"model=models:/{NAME}@champion", "port=0"]
    proc = subprocess.Popen(args, cwd=registered.folder, env=env, stderr=subprocess.PIPE, text=True)
    log: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [log.put(line) for line in proc.stderr], daemon=True).start()
    try:
        line = log.get(timeout=180)  # said once the port is bound and the model loaded
        assert line.startswith("equip app: http://127.0.0.1:"), line + "".join(log.queue)
        yield RunningApp(line.split()[2])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(log.queue)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def serve(uri: str) -> tuple[AppServer, ModelHolder]:
    """The app in this process, on uvicorn in a thread."""
    holder = ModelHolder(uri)
    return AppServer(create_app(holder), bind("127.0.0.1", 0)).start(), holder


def post_files(url: str, photos: list[tuple[str, bytes]], field: str = "files"):
    files = [(field, (name, data, "application/octet-stream")) for name, data in photos]
    return requests.post(f"{url}/predict", files=files, timeout=120)


def top3(frame) -> list[list[tuple[str, str]]]:
    """predict's answer as the page shows it: the three likeliest classes, in percent."""
    out = []
    for _, row in frame.iterrows():
        probs = [(k.removeprefix("p_"), v) for k, v in row.items() if k.startswith("p_")]
        out.append([(c, f"{100 * p:.1f}%") for c, p in sorted(probs, key=lambda kv: -kv[1])[:3]])
    return out


def gear_photos() -> list[Path]:
    """The first photo of three classes of the shared gear photos; none where they are absent."""
    if not GEAR.is_dir():
        return []
    folders = sorted(p for p in GEAR.iterdir() if p.is_dir())[:3]
    return [sorted(f for f in folder.iterdir() if f.is_file())[0] for folder in folders]


DROP = """([name, data, type]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const files = new DataTransfer();
  files.items.add(new File([bytes], name, {type: type}));
  document.getElementById("drop").dispatchEvent(
    new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
}"""


def shown(page, count: int) -> dict[str, list[tuple[str, str]]]:
    """Once `count` photos are classified: each photo's name -> its (class, percent) rows."""
    page.wait_for_function(
        f"document.querySelectorAll('figure[data-classes]').length === {count}", timeout=60_000
    )
    cards = {}
    for figure in page.locator("figure.photo").all():
        rows = figure.locator(".top li").all()
        cards[figure.locator(".name").inner_text()] = [
            (row.locator(".cls").inner_text(), row.locator(".prob").inner_text()) for row in rows
        ]
    return cards


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")
def test_the_page_shows_each_photo_with_the_classes_predict_gives(
    app: RunningApp, registered: Registered, tmp_path: Path
):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from tests.test_browser import FLAGS

    synthetic = write_pngs(tmp_path / "synthetic", 1)[0]
    gear = gear_photos()  # the gear part is left out where the shared photos are absent
    shot = tmp_path / "app.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(app.url)
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator("#model-name").inner_text() == NAME
        assert page.locator("#model-version").inner_text() == "1"
        assert page.locator("#model-run").inner_text() == registered.run_id
        assert (
            page.locator("#run-hint").inner_text()
            == f"mlflow ui --backend-store-uri {registered.uri}"
        )
        drawn = base64.b64encode(synthetic.read_bytes()).decode()
        page.evaluate(DROP, ["drawn.png", drawn, "image/png"])
        shown(page, 1)
        if gear:
            page.set_input_files("#files", [str(f) for f in gear])
        cards = shown(page, 1 + len(gear))
        assert page.locator("#error").is_hidden()
        # Offline: everything the page loads comes from the app (the photos from the page).
        assert [u for u in requested if not u.startswith((app.url, "blob:"))] == []
        page.screenshot(path=str(shot), full_page=True)
        page.evaluate(DROP, ["notes.txt", base64.b64encode(b"a note").decode(), "text/plain"])
        assert page.locator("#error").inner_text() == "not images, left out: notes.txt"
        browser.close()
    mlflow.set_tracking_uri(registered.uri)
    predict = load_predictor(f"models:/{NAME}@champion")
    # The same photos in the same requests as the page's: one drop, then one pick.
    expected = {"drawn.png": top3(predict_files(predict, [synthetic]))[0]}
    if gear:
        expected |= dict(
            zip([f.name for f in gear], top3(predict_files(predict, gear)), strict=True)
        )
    assert cards == expected
    assert shot.stat().st_size > 20_000  # photos, bars and text: not a blank page


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height: a few bytes that would decode to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


BAD = {
    "not an image": (
        dict(photos=[("notes.png", b"just some text")]),
        400,
        "notes.png could not be decoded",
    ),
    "decompression bomb": (
        dict(photos=[("bomb.png", png_claiming(9000, 9000))]),
        400,
        "bomb.png has 9000x9000 pixels; at most 40 MP",
    ),
    "50 MB photo": (
        dict(photos=[("big.jpg", b"\xff" * 50 * MB)]),
        413,
        "big.jpg: larger than 20 MB",
    ),
    "wrong field": (
        dict(photos=[("a.png", b"x")], field="photo"),
        400,
        "multipart field 'files'; the request has 'photo'",
    ),
    "65 MB request": (
        dict(photos=[("a.jpg", b"\0" * 65 * MB)]),
        413,
        "a request holds at most 64 MB",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_upload_is_refused_in_one_line_without_server_detail(
    app: RunningApp, registered: Registered, case: str
):
    kwargs, status, says = BAD[case]
    reply = post_files(app.url, **kwargs)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert "\n" not in reply.text and list(reply.json()) == ["error"]
    assert says in reply.json()["error"]
    for detail in (str(registered.folder), str(ROOT), "Traceback", 'File "'):
        assert detail not in reply.text


def test_json_requests_and_their_mistakes(app: RunningApp, tmp_path: Path):
    photo = base64.b64encode(write_pngs(tmp_path, 1)[0].read_bytes()).decode()
    ok = requests.post(f"{app.url}/predict", json={"images": [photo, photo]}, timeout=60)
    answers = ok.json()["predictions"]
    assert ok.status_code == 200 and [a["name"] for a in answers] == ["image 0", "image 1"]
    assert answers[0] == {**answers[1], "name": "image 0"} and len(answers[0]["top"]) == 3
    assert ok.json()["model"]["version"] == "1"
    # The CNN was logged with its ONNX graph: runtime=auto serves it on ONNX Runtime.
    assert requests.get(f"{app.url}/model", timeout=60).json()["runtime"] == "onnx"
    for body, status, says in [
        ({"images": ["not base64!"]}, 400, "image 0: not base64-encoded image bytes"),
        ({"image": photo}, 400, '{"images": ["<base64>", ...]}'),
        ({"images": [photo] * 513}, 400, "513 photos in one request; send at most 512"),
    ]:
        reply = requests.post(f"{app.url}/predict", json=body, timeout=60)
        assert (reply.status_code, reply.json()) == (status, {"error": reply.json()["error"]})
        assert says in reply.json()["error"]
    text = requests.post(f"{app.url}/predict", data="x", timeout=60)
    assert text.status_code == 415 and "multipart/form-data" in text.json()["error"]
    assert requests.get(f"{app.url}/nowhere", timeout=60).json() == {"error": "Not Found"}


def test_two_clients_at_once_get_their_own_answers(app: RunningApp, tmp_path: Path):
    photos = [(p.name, p.read_bytes()) for p in write_pngs(tmp_path, 4)]
    mine, theirs = photos[:1], photos[1:]  # one photo against three, so answers cannot swap
    expected = [post_files(app.url, batch).json()["predictions"] for batch in (mine, theirs)]
    start = threading.Barrier(2)

    def client(batch: list[tuple[str, bytes]]) -> list[list[dict]]:
        start.wait()
        return [post_files(app.url, batch).json()["predictions"] for _ in range(6)]

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(client, (mine, theirs)))
    for got, want in zip(answers, expected, strict=True):
        for answer in got:
            assert [(a["name"], a["class"]) for a in answer] == [
                (a["name"], a["class"]) for a in want
            ]
            probs = [t["probability"] for a in answer for t in a["top"]]
            assert probs == pytest.approx([t["probability"] for a in want for t in a["top"]])


def crown_a_copy(client: MlflowClient, name: str, score: float) -> str:
    """A new version of `name`: the trained model again, crowned by a higher score."""
    first = client.get_model_version(NAME, "1")
    version = client.create_model_version(
        name, first.source, first.run_id, tags={schema.SCORE: str(score)}
    ).version
    assert champion.crown(client, name, "champion", str(version))
    return str(version)


def test_a_fixed_model_is_not_reloaded(registered: Registered):
    mlflow.set_tracking_uri(registered.uri)
    server, holder = serve(f"models:/{NAME}/1")
    try:
        reply = requests.post(f"{server.url}/reload", timeout=60)
        assert reply.status_code == 409 and "one fixed model" in reply.json()["error"]
        assert holder.reload() is False and holder.current.version == "1"
    finally:
        server.stop()


def test_a_new_champion_is_served_without_a_restart(registered: Registered):
    mlflow.set_tracking_uri(registered.uri)
    client = MlflowClient(registered.uri)
    name = "app-reloaded"
    client.create_registered_model(name)
    crown_a_copy(client, name, 0.1)
    server, holder = serve(f"models:/{name}@champion")
    try:
        answers: list[tuple[int, str]] = []  # (status, model version) of each request, in order
        swapped = threading.Event()

        def keep_asking() -> None:  # requests in flight while the model is swapped
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if swapped.is_set() and answers[-1][1] == "2":
                    return
                reply = post_files(server.url, [("a.png", write_png_bytes())])
                answers.append((reply.status_code, reply.json().get("model", {}).get("version")))

        asker = threading.Thread(target=keep_asking)
        asker.start()
        wait_until(lambda: answers, "a first answer")
        assert requests.post(f"{server.url}/reload", timeout=60).json()["changed"] is False
        crown_a_copy(client, name, 0.2)
        reply = requests.post(f"{server.url}/reload", timeout=120).json()
        assert (reply["changed"], reply["version"]) == (True, "2")
        swapped.set()
        asker.join(timeout=130)
        assert {status for status, _ in answers} == {200}
        versions = [version for _, version in answers]
        assert versions[0] == "1" and versions[-1] == "2" and versions == sorted(versions)

        crown_a_copy(client, name, 0.3)  # now found by polling
        holder.poll(0.05)
        wait_until(lambda: holder.current.version == "3", "the poller to serve version 3")
        assert requests.get(f"{server.url}/model", timeout=60).json()["version"] == "3"

        holder.stop()
        client.delete_model_version_tag(name, "3", schema.champion_tag("champion"))
        reply = requests.post(f"{server.url}/reload", timeout=60)  # no champion: keep serving
        assert reply.status_code == 503 and "still serving models:/app-reloaded/3" in reply.text
        assert requests.get(f"{server.url}/model", timeout=60).json()["version"] == "3"
    finally:
        holder.stop()
        server.stop()


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.02)


@functools.cache
def write_png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), "orange").save(buffer, "PNG")
    return buffer.getvalue()


def test_what_the_command_refuses_is_one_line(
    registered: Registered, capsys: pytest.CaptureFixture[str]
):
    store = f"tracking_uri={registered.uri}"
    for args, says in [
        (["model=models:/nobody@champion", store, "port=0"], "no version of registered model"),
        (["port=eighty"], "port: Value 'eighty'"),
        (["colour=blue"], "colour: Key 'colour' not in"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            app_main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and says in err, err
    with bind("127.0.0.1", 0) as taken, pytest.raises(SystemExit):
        app_main([store, f"port={taken.getsockname()[1]}"])
    assert "cannot listen there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["serve"])
    assert "no command 'serve'; one of app, predict" in capsys.readouterr().err


def test_the_run_link_goes_to_the_mlflow_ui_of_the_store():
    view = "?workflowType=machine_learning"  # MLflow 3.15 opens the model-training view
    assert run_link("http://user:secret@host:5000/", "4", "abc") == {
        "url": f"http://***@host:5000/#/experiments/4/runs/abc{view}"  # no credentials
    }
    assert run_link("sqlite:////data/mlflow.db", "4", "abc") == {
        "command": "mlflow ui --backend-store-uri sqlite:////data/mlflow.db",
        "url": f"http://127.0.0.1:5000/#/experiments/4/runs/abc{view}",
    }
    assert run_link("azureml://eastus.api.azureml.ms/mlflow/v1.0/x", "4", "abc") == {}


def test_the_commands_load_torch_and_the_web_stack_only_to_serve():
    """`equip -h`, `python -m equip.app -h` and the other commands start fast."""
    code = (
        "import sys, equip.cli, equip.app; equip.cli.main(['-h']); equip.app.main(['-h']); "
        "print(sorted({'torch', 'lightning', 'fastapi', 'uvicorn'} & set(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "[]", out.stdout + out.stderr


def test_the_command_serves_a_new_champion_on_request(app: RunningApp, registered: Registered):
    """Last of the module's uses of `app` (it moves the champion): the command's process, whose
    objects are frozen out of the collector's sight, swaps in the new version too."""
    version = crown_a_copy(MlflowClient(registered.uri), NAME, 1e9)
    reply = requests.post(f"{app.url}/reload", timeout=120).json()
    assert (reply["changed"], reply["version"]) == (True, version)
    answer = post_files(app.url, [("a.png", write_png_bytes())]).json()
    assert answer["model"]["version"] == version and len(answer["predictions"]) == 1
