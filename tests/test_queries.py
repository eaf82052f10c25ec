"""Issue 15: equip searches MLflow only in the dialect an Azure ML workspace supports, and marks
the champion with a version tag that two gates crowning at once cannot leave on two versions."""

from __future__ import annotations

import inspect
import itertools

import pytest
from mlflow import MlflowClient
from mlflow.utils.search_utils import SearchUtils

from equip.errors import EquipError
from equip.track import champion, queries, schema

SAMPLES = {  # a value for each argument a filter builder takes
    "parent_id": "0123456789abcdef0123456789abcdef",
    "tags": {schema.CONFIG_HASH: "a1b2c3", "equip.azureml_job": "gentle_fox_5x2"},
    "sweep_key": "9f8e7d6c5b4a3921",
    "fingerprint": "4c1d9e2f",
    "split_key": "00ff00ff00ff00ff",
    "folds_key": "ff00ff00ff00ff00",
    "cv_key": "1234abcd5678ef90",
    "name": "equip-gear",
}


def builders() -> dict[str, str]:
    """Every filter builder of equip.track.queries (a public function returning a filter),
    called with the sample values: a new builder is checked here without being listed."""
    built = {}
    for name, fn in inspect.getmembers(queries, inspect.isfunction):
        if fn.__module__ != queries.__name__ or name.startswith(("_", "check_")):
            continue
        if inspect.signature(fn).return_annotation != "str":
            continue
        args = [SAMPLES[p] for p in inspect.signature(fn).parameters]
        built[name] = fn(*args)
    return built


def test_every_filter_equip_builds_is_in_the_supported_dialect():
    built = builders()
    expected = {"tags_equal", "children_of", "sweep_parent", "baseline_runs", "baseline_folds"}
    assert expected | {"config_runs", "model_named"} <= set(built)
    for name, text in built.items():
        if name == "model_named":
            assert queries.check_model_filter(text) == "name = 'equip-gear'"
            continue
        assert queries.check_filter(text) == text, name
        assert "`" not in text and "attributes" not in text and "!=" not in text
        # MLflow reads each clause as the tag it names: dotted names need no backticks.
        for clause in SearchUtils.parse_search_filter(text):
            assert clause["type"] == "tag" and clause["comparator"] == "="
            assert f"tags.{clause['key']} = '{clause['value']}'" in text, clause
    assert queries.check_order_by(queries.NEWEST_FIRST) == ["start_time DESC"]


@pytest.mark.parametrize(
    "text",
    [
        "tags.mlflow.parentRunId = 'abc'",
        "tags.equip.cv_key = 'x' and params.lr = '0.1' and params.lr != '0.2'",
        "metrics.best_val_acc >= 0.9 AND metrics.loss < 1e-3 and metrics.n = 3",
        "",
    ],
)
def test_the_check_accepts_the_supported_forms(text: str):
    assert queries.check_filter(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "attributes.status = 'FINISHED'",  # run attributes
        "status = 'FINISHED'",
        "attributes.start_time > 1700000000000",  # run fields
        "run_name = 'x'",
        "tags.`equip.sweep_key` = 'x'",  # escaped names
        "params.`data.folds` = '5'",
        'metrics."val acc" > 0.5',
        "params.data.folds = '5'",  # a dotted param name (one that would need escaping)
        "tags.equip.sweep_key != ''",  # != on a tag
        "tags.a LIKE 'x%'",
        "params.a ILIKE '%x'",
        "tags.a = 'x' OR tags.b = 'y'",
        "tags.a IS NULL",
        "attributes.run_id IN ('a', 'b')",
        'tags.a = "x"',  # double quotes
        "metrics.acc > '0.5'",
        "tags.a = 'x' and",
        "tags.a = 'x' tags.b = 'y'",
    ],
)
def test_the_check_rejects_what_the_workspace_does_not_support(text: str):
    with pytest.raises(queries.UnsupportedQuery):
        queries.check_filter(text)


def test_orderings_and_model_searches_outside_the_dialect_are_rejected():
    for order in ("metrics.best_val_acc DESC", "attributes.start_time DESC", "tags.x ASC"):
        with pytest.raises(queries.UnsupportedQuery):
            queries.check_order_by([order])
    for text in ("name LIKE 'equip%'", "tags.champion = 'true'", "name = 'a' and tags.x = 'y'"):
        with pytest.raises(queries.UnsupportedQuery):
            queries.check_model_filter(text)
    with pytest.raises(queries.UnsupportedQuery, match="single quote"):
        queries.tags_equal({"equip.x": "it's"})


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    """One sqlite store for the module (a registered model per test case): a new store costs
    seconds."""
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db")


def test_searches_read_every_page_newest_first_and_filter_on_the_client(registry: MlflowClient):
    client = registry
    exp = client.create_experiment("pages")
    pattern = r"^(\d+)[x_]"  # MLflow takes a backslash literally: it must stay one
    ids = []
    for i in range(5):
        run = client.create_run(exp, start_time=1000 + i, tags={"equip.p": pattern})
        ids.append(run.info.run_id)
    client.create_run(exp, start_time=2000, tags={"equip.p": "other"})
    client.set_terminated(ids[1], "FINISHED")
    where = queries.tags_equal({"equip.p": pattern})
    found = list(queries.iter_runs(client, [exp], where, page_size=2))  # three pages
    assert [r.info.run_id for r in found] == ids[::-1]
    finished = queries.has_status("FINISHED")
    assert [r.info.run_id for r in queries.search_runs(client, [exp], where, finished)] == [ids[1]]
    assert queries.first_run(client, [exp], where).info.run_id == ids[4]
    assert len(queries.search_runs(client, [exp], limit=4)) == 4


MODELS = itertools.count()


def new_model(client: MlflowClient, scores: list[float]) -> str:
    """A registered model with one version per score, none of them champion yet."""
    name = f"gear-{next(MODELS)}"
    client.create_registered_model(name)
    for s in scores:
        client.create_model_version(name, "file:///nowhere", tags={schema.SCORE: f"{s:.6f}"})
    return name


def tagged(client: MlflowClient, name: str) -> list[str]:
    tag = schema.champion_tag("champion")
    return [str(v.version) for v in queries.model_versions(client, name) if tag in v.tags]


# Two gates crown at once (versions 2 and 3; version 1 was the champion): every order of their
# steps, each gate tagging before it settles, leaves one champion, the best-scored.
ORDERS = sorted(
    {
        o
        for o in itertools.permutations(["tag2", "settle2", "tag3", "settle3"])
        if o.index("tag2") < o.index("settle2") and o.index("tag3") < o.index("settle3")
    }
)


@pytest.mark.parametrize("scores", [[0.5, 0.9, 0.8], [0.5, 0.8, 0.9], [0.95, 0.8, 0.9]])
@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_two_gates_crowning_at_once_leave_one_champion(
    registry: MlflowClient, scores: list[float], order: tuple[str, ...]
):
    name = new_model(registry, scores)
    assert champion.crown(registry, name, "champion", "1")
    for step in order:
        version = step[-1]
        if step.startswith("tag"):
            registry.set_model_version_tag(name, version, schema.champion_tag("champion"), "true")
        else:
            champion.settle(registry, name, "champion")
    best = str(1 + max(range(3), key=lambda i: scores[i]))
    assert tagged(registry, name) == [best]
    assert champion.champion_uri(registry, name, "champion") == f"models:/{name}/{best}"


def test_no_champion_is_one_line_naming_the_tag(registry: MlflowClient):
    name = new_model(registry, [0.5])
    with pytest.raises(EquipError, match=rf"no version of registered model '{name}' is tagged"):
        champion.champion_uri(registry, name, "champion")
