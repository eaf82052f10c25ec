"""End to end, as a person sees it: the smoke sweep logged over HTTP, then the MLflow UI in a
real headless Chromium. `.ci/run` installs Chromium (Debian) and Playwright (PyPI)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import parent_and_children, sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium"),
]
# No background services: this machine has no network beyond loopback.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_smoke_sweep_shows_as_one_parent_with_its_children_in_the_ui(
    tmp_path: Path, mlflow_server: str
):
    proc = sweep("sweep=smoke", cwd=tmp_path, env_uri=mlflow_server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = parent_and_children(MlflowClient(mlflow_server))
    assert parent.info.run_name == "sweep smoke" and len(children) == 4

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{mlflow_server}/#/experiments/{parent.info.experiment_id}/runs")
        row = page.locator(".ag-row", has_text="sweep smoke")
        row.wait_for(timeout=60_000)
        # Children are folded under their parent until it is expanded.
        assert not page.get_by_text(children[0].info.run_name, exact=True).is_visible()
        row.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
        for child in children:
            page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "mlflow-ui-sweep.png"))
        browser.close()
    assert (tmp_path / "mlflow-ui-sweep.png").stat().st_size > 10_000
