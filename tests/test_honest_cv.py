"""bench/honest_cv.py, the honest-CV table of issue 17: what it would train, and its table;
bench/tta_folds.py, which re-scores a finished row's fold models with each model.tta."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from equip.sweep.crossval import CvResult
from tests.conftest import ready_store, train_in_process

ROOT = Path(__file__).resolve().parents[1]


def bench_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def honest_cv():
    return bench_script("honest_cv")


def cv(parent: str, *scores: float, folds_key: str = "k") -> CvResult:
    return CvResult(parent, dict(enumerate(scores)), {}, len(scores), folds_key)


def test_the_table_pairs_each_row_with_the_baseline_and_the_recipe_fold_by_fold(honest_cv):
    results = {
        "baseline": cv("b", 0.90, 0.92, 0.94),
        "gear": cv("g", 0.95, 0.95, 0.98),  # +0.05, +0.03, +0.04: mean +0.04, SE 0.0058
        "swa": cv("s", 0.96, 0.96, 0.98),  # vs gear +0.01, +0.01, 0: +0.0067 (0.0033);
        # vs the baseline +0.06, +0.04, +0.04: +0.0467 (0.0067)
        "mixup": None,
        "cutmix": cv("c", 0.9, 0.9, folds_key="other"),  # other folds: nothing to pair
    }
    lines = honest_cv.table(results, {"baseline": 3.0, "gear": 412.4})
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "0.9200 ± 0.0200" in rows["baseline"] and rows["baseline"].rstrip().endswith("3.0")
    assert "+0.0400 (0.0058)" in rows["gear"] and "412.4" in rows["gear"]
    assert "+0.0467 (0.0067)" in rows["swa"] and "+0.0067 (0.0033)" in rows["swa"]
    assert "not trained" in rows["mixup"]
    assert "(" not in rows["cutmix"]  # never paired across different folds


def test_a_dry_run_lists_each_rows_cv_sweep_and_trains_nothing(
    honest_cv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = ready_store(tmp_path)
    args = ["--data", "synthetic", "--per-class", "3", "--image-size", "16", "--epochs", "1"]
    args += ["--folds", "2", "--rows", "baseline,lab05,swa", "--tracking-uri", uri, "--dry-run"]
    assert honest_cv.main([*args, "--set", "model.filters=[4,8]", "data.batch_size=8"]) == 0
    out = capsys.readouterr().out
    common = "python train.py -m sweep=cv experiment=gear data=synthetic data.per_class=3"
    for row, extra in (
        ("baseline", "model=baseline data.batch_size=8"),  # model.* of --set is the CNN's
        ("lab05", "model=cnn model.filters=[4,8] data.batch_size=8"),
        ("swa", "trainer.swa_lrs=0.0003 trainer.swa_epoch_start=0.75 model.filters=[4,8]"),
    ):
        (line,) = [x for x in out.splitlines() if x.startswith(f"{row}: to train: ")]
        assert line.startswith(f"{row}: to train: {common}") and extra in line, line
    assert out.count("not trained") == 3
    assert MlflowClient(uri).search_runs(["0", "1"]) == []
    with pytest.raises(SystemExit):
        honest_cv.main(["--rows", "baseline,bogus"])
    assert "--rows: unknown bogus" in capsys.readouterr().err


def test_tta_folds_rescores_each_fold_model_on_its_own_val_fold_as_its_run_logged(
    honest_cv, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """The fold run's checkpoint and data/split.csv must give back the accuracy it logged (else
    the script stops): what makes a TTA comparison without retraining a paired one."""
    tta_folds = bench_script("tta_folds")
    uri = ready_store(tmp_path)
    args = ["--data", "synthetic", "--per-class", "6", "--image-size", "16", "--epochs", "2"]
    args += ["--folds", "2", "--tracking-uri", uri]
    extra = ["model.filters=[4,8]", "trainer.precision=32-true"]  # bf16 could flip a near tie
    overrides = honest_cv.row_overrides(
        "lab05", honest_cv.base_overrides(honest_cv.parse(args)), extra
    )
    done = train_in_process(["-m", "sweep=cv", *overrides, "data.fold=0,1"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    capsys.readouterr()
    assert tta_folds.main([*args, "--rows", "lab05", "--tta", "none,hflip", "--set", *extra]) == 0
    out = capsys.readouterr().out
    folds = [line for line in out.splitlines() if line.startswith("lab05 fold ")]
    assert len(folds) == 2 and all("(36 photos, tta=none)" in line for line in folds), out
    summary = out.split("lab05: val accuracy by model.tta over 2 folds")[1].splitlines()
    [logged] = [line.split()[1] for line in summary if line.strip().startswith("logged")]
    [none] = [line.split()[1:3] for line in summary if line.strip().startswith("none")]
    assert none[0] == logged and none[1] == "±"
