"""What an oversized request leaves behind in a served model's process.

Trains a tiny CNN into a store in --workdir (python train.py, 16 px, 2 epochs), serves its
logged model with `mlflow models serve --env-manager local`, and reads the resident memory
(RSS) of the serving process after a warm-up request, after each of --repeat refused requests
of --mb megabytes (one base64 image far over the 20 MB limit), and after a normal request again.

    python bench/serve_memory.py [--mb 165] [--repeat 3] [--workdir /tmp/serve-memory]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_a_model(workdir: Path) -> str:
    """The run id of a tiny CNN with its logged model."""
    args = ["data.image_size=16", "data.per_class=4", "trainer=debug", "trainer.progress_bar=false"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    return re.findall(r"MLflow: run ([0-9a-f]{32})", done.stderr)[-1]


def post(port: int, body: bytes) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def request_of(image: bytes) -> bytes:
    rows = [[base64.b64encode(image).decode()]]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def rss_mb(server: psutil.Process) -> float:
    """RSS of the process in the serving tree that holds the model (the largest)."""
    tree = [server, *server.children(recursive=True)]
    return max(p.memory_info().rss for p in tree) / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=165)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/serve-memory"))
    a = parser.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    run_id = train_a_model(a.workdir)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{a.workdir}/mlflow.db"}
    serve = ["mlflow", "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local"]
    server = subprocess.Popen(
        [sys.executable, "-m", *serve, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from PIL import Image

        png = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(png, "PNG")
        normal = request_of(png.getvalue())
        deadline = time.time() + 180
        while True:
            try:
                assert post(port, normal) == 200
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the model server did not answer") from None
                time.sleep(0.5)
        proc = psutil.Process(server.pid)
        before = rss_mb(proc)
        print(f"after a normal request: RSS {before:.0f} MB")
        oversized = request_of(b"\0" * (a.mb * MB * 3 // 4))  # base64: a.mb MB of text
        print(f"oversized request: {len(oversized) / MB:.0f} MB of JSON")
        for i in range(a.repeat):
            t0 = time.perf_counter()
            status = post(port, oversized)
            took = time.perf_counter() - t0
            grown = rss_mb(proc) - before
            time.sleep(3)  # the request's objects are freed once its handler has returned
            idle = rss_mb(proc) - before
            print(
                f"refused #{i + 1}: HTTP {status} in {took:.1f} s, RSS +{grown:.0f} MB at the "
                f"answer, +{idle:.0f} MB 3 s later"
            )
        assert post(port, normal) == 200
        print(f"after a normal request again: RSS +{rss_mb(proc) - before:.0f} MB")
    finally:
        for p in [*psutil.Process(server.pid).children(recursive=True)]:
            p.kill()
        server.kill()


if __name__ == "__main__":
    main()
