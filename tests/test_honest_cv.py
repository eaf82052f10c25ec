"""bench/honest_cv.py, the honest-CV table of issue 17: what it would train, and its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from equip.sweep.crossval import CvResult
from tests.conftest import ready_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def honest_cv():
    spec = importlib.util.spec_from_file_location("honest_cv", ROOT / "bench" / "honest_cv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
