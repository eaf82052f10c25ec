"""hydra/launcher=azureml: the jobs a sweep would submit, checked with the azure-ai-ml SDK's own
job schema, and the one-line errors. Nothing here reaches Azure or any network: dry runs run with
every IPv4/IPv6 connection refused (and recorded), and azure-identity is limited to the Azure CLI
credential, which is absent here (as in tests/test_azure.py)."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("azure.ai.ml")
pytest.importorskip("azureml.mlflow")

from azure.ai.ml import load_job  # noqa: E402

from equip.azureml_launch import pip_requirements  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

WORKSPACE = ["tracking=azureml", "tracking.subscription_id=00000000-0000-0000-0000-000000000000",
             "tracking.resource_group=rg", "tracking.workspace_name=ws"]  # fmt: skip
LAUNCHER = ["hydra/launcher=azureml", "hydra.launcher.compute=cpu-cluster"]
# Runs train.py with outgoing connections refused; an attempt is written to NET_LOG.
NO_NETWORK = """
import os, runpy, socket, sys
_connect = socket.socket.connect
def guarded(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        with open(os.environ["NET_LOG"], "a") as f:
            f.write(repr(address) + "\\n")
        raise ConnectionRefusedError("network is off in this test")
    return _connect(self, address)
socket.socket.connect = guarded
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "EQUIP_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["AZURE_TOKEN_CREDENTIALS"] = "AzureCliCredential"  # no metadata / token endpoint probes
    env["NET_LOG"] = str(tmp_path / "network.log")
    return subprocess.run(
        [sys.executable, "-c", NO_NETWORK, str(ROOT / "train.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def job_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("multirun/*/*/*.azureml.yaml"))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("equip: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_dry_run_builds_every_job_of_the_architecture_sweep(tmp_path: Path):
    result = train(tmp_path, "-m", "sweep=architecture", *LAUNCHER,
                   "hydra.launcher.dry_run=true", *WORKSPACE)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "network.log").exists()  # no connection was even attempted
    assert not (tmp_path / "mlflow.db").exists()  # and no local store stands in for Azure
    files = job_files(tmp_path)
    assert len(files) == 24
    assert f"job files in {files[0].parent}/*.azureml.yaml" in result.stderr

    expected_pip = pip_requirements(ROOT)
    assert "mlflow==3.15.0" in expected_pip and not any("azure-ai-ml" in p for p in expected_pip)
    points = set()
    for f in files:
        job = load_job(f)  # the SDK's own schema accepts the file as it is
        assert job._validate().passed
        assert job.type == "command" and job.compute == "cpu-cluster"
        assert Path(job.code) == ROOT
        assert not job.inputs  # built-in data: nothing to mount
        env = job.environment
        assert env.image.startswith("mcr.microsoft.com/azureml/")
        assert env.conda_file["dependencies"][-1]["pip"] == expected_pip
        assert job.environment_variables["EQUIP_PARENT_RUN_ID"] == "DRY-RUN-NO-PARENT-RUN"
        assert job.environment_variables["EQUIP_SWEPT_KEYS"] == (
            "model.filters,model.kernel_sizes,model.hidden,model.batch_norm"
        )
        child_tags = json.loads(job.environment_variables["MLFLOW_RUN_CONTEXT"])
        assert child_tags == {"equip.azureml_job": job.name,
                              "equip.launch_key": job.tags["equip.launch_key"]}  # fmt: skip
        argv = shlex.split(job.command)
        assert argv[:3] == ["python", "train.py", "-m"]
        overrides = dict(a.split("=", 1) for a in argv[3:] if "=" in a)
        assert overrides["sweep"] == "architecture" and overrides["tracking"] == "azureml"
        assert not any(k.startswith("tracking.") for k in overrides)  # the injected URI is used
        assert "~hydra.callbacks.sweep_tracker" in argv  # the parent exists: no second one
        points.add(tuple(overrides[k] for k in ("model.filters", "model.kernel_sizes",
                                                 "model.hidden", "model.batch_norm")))  # fmt: skip
    grid = itertools.product(["[32,64]", "[32,64,128]", "[16,32,64,128]"], ["3", "5"],
                             ["[]", "[128]"], ["False", "True"])  # fmt: skip
    assert points == set(grid)


def test_a_local_data_folder_is_an_input_and_an_azureml_path_is_used_as_is(tmp_path: Path):
    photos = tmp_path / "photos"
    for c in ("ropes", "helmets"):
        (photos / c).mkdir(parents=True)
        (photos / c / "1.png").write_bytes(b"not decoded in a dry run")
    result = train(tmp_path, "-m", "data=folder", f"data.root={photos},azureml:gear-photos:3",
                   *LAUNCHER, "hydra.launcher.dry_run=true", *WORKSPACE)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    files = job_files(tmp_path)
    written = sorted(yaml.safe_load(f.read_text())["inputs"]["data"]["path"] for f in files)
    assert written == sorted([str(photos), "azureml:gear-photos:3"])
    for j in map(load_job, files):
        assert j.inputs["data"]._data.type == "uri_folder"
        assert j.inputs["data"]._data.path in (str(photos), "gear-photos:3")  # asset name:version
        argv = shlex.split(j.command)
        assert "data.root=${{inputs.data}}" in argv  # the mounted folder, substituted by Azure ML
        assert str(photos) not in j.command


def test_a_bad_compute_name_is_one_line(tmp_path: Path):
    result = train(tmp_path, "-m", "model.lr=0.001,0.01", "hydra/launcher=azureml",
                   "hydra.launcher.compute=cpu_cluster", "hydra.launcher.dry_run=true",
                   *WORKSPACE)  # fmt: skip
    line = one_error_line(result)
    assert "hydra.launcher.compute='cpu_cluster' is not an Azure ML compute name" in line
    assert not job_files(tmp_path)


def test_missing_workspace_settings_are_one_line(tmp_path: Path):
    result = train(tmp_path, "-m", "model.lr=0.001,0.01", *LAUNCHER,
                   "hydra.launcher.dry_run=true", "tracking=azureml")  # fmt: skip
    line = one_error_line(result)
    assert "missing: subscription_id, resource_group, workspace_name" in line


def test_a_sweep_on_azure_must_log_to_the_workspace(tmp_path: Path):
    result = train(tmp_path, "-m", "model.lr=0.001,0.01", *LAUNCHER, "hydra.launcher.dry_run=true")
    assert "add tracking=azureml" in one_error_line(result)


def test_without_credentials_nothing_is_submitted(tmp_path: Path):
    result = train(tmp_path, "-m", "model.lr=0.001,0.01", *LAUNCHER, *WORKSPACE)
    assert "no usable Azure credentials: sign in with `az login`" in one_error_line(result)
    assert not (tmp_path / "network.log").exists()
