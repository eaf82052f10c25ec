"""Every MLflow search equip makes, in the one dialect an Azure ML workspace answers.

The workspace supports far less than MLflow's own search grammar (Microsoft's support matrices
"Query & compare experiments and runs with MLflow" and "Manage model registries in Azure Machine
Learning with MLflow"): run filters are `AND`-joined equality on tags and params (`!=` on params
only), numeric comparisons on metrics, no backticked names, no `attributes.*`, no LIKE/ILIKE/OR;
runs are ordered by `start_time`/`end_time` only; registered models are searched by name only.
So equip filters on identity tags (one tag per identity, e.g. a split key, rather than five
params), and does status checks, "best by a metric" and "not equal on a tag" itself, over a
narrowed result read page by page. The same requests go to sqlite, an MLflow server and the
workspace, so what the tests prove locally holds there. `check_filter` rejects anything else:
every search below goes through it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any

from equip.track import schema

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

PAGE_SIZE = 1000  # MLflow's own default page of search_runs
NEWEST_FIRST = ("start_time DESC",)  # the one ordering equip asks for (a run field)

_WORD = r"[A-Za-z_][A-Za-z0-9_]*"
# A tag name may be dotted (`tags.mlflow.parentRunId` is the workspace's own documented example,
# and MLflow parses dotted names without backticks); param and metric names must be plain words.
_DOTTED = rf"{_WORD}(?:\.{_WORD})*"
_VALUE = r"'[^']*'"
_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CLAUSE = re.compile(
    rf"tags\.{_DOTTED} = {_VALUE}"
    rf"|params\.{_WORD} !?= {_VALUE}"
    rf"|metrics\.{_WORD} (?:[<>]=?|!?=) {_NUMBER}"
)
_AND = re.compile(r" and ", re.IGNORECASE)
_ORDER = re.compile(r"(?:start_time|end_time)(?: (?:ASC|DESC))?")
_MODEL_FILTER = re.compile(rf"name = {_VALUE}")


class UnsupportedQuery(ValueError):
    """A search an Azure ML workspace would refuse: a bug in equip, never the user's input."""


def check_filter(text: str) -> str:
    """`text` if it is a run filter the workspace supports (see the module doc), else raise."""
    pos = 0
    while text:
        clause = _CLAUSE.match(text, pos)
        if clause is None:
            raise UnsupportedQuery(f"unsupported run filter at {text[pos:]!r} in {text!r}")
        pos = clause.end()
        if pos == len(text):
            return text
        joint = _AND.match(text, pos)
        if joint is None:
            raise UnsupportedQuery(f"clauses must be joined by ' and ': {text!r}")
        pos = joint.end()
    return text


def check_order_by(order_by: Iterable[str]) -> list[str]:
    """The ordering if it is by run fields only (start_time, end_time), else raise."""
    order = list(order_by)
    for item in order:
        if not _ORDER.fullmatch(item):
            raise UnsupportedQuery(f"unsupported ordering {item!r}: start_time or end_time only")
    return order


def check_model_filter(text: str) -> str:
    """A registered-model search by name equality, the only one the workspace supports."""
    if not _MODEL_FILTER.fullmatch(text):
        raise UnsupportedQuery(f"unsupported model search {text!r}: only name = '<name>'")
    return text


# ---------------------------------------------------------------- filters
def _quoted(value: str) -> str:
    # MLflow takes what is between the quotes as it is (a backslash stays one); the workspace's
    # grammar has no escapes, so a value holding ' cannot be searched for. equip's identities
    # (run ids, hashes, model kinds, job names) never hold one.
    if "'" in value:
        raise UnsupportedQuery(f"a searched value cannot hold a single quote: {value!r}")
    return f"'{value}'"


def tags_equal(tags: Mapping[str, str]) -> str:
    """Runs whose tags have these values (an empty mapping: every run)."""
    return check_filter(" and ".join(f"tags.{k} = {_quoted(str(v))}" for k, v in tags.items()))


def children_of(parent_id: str, tags: Mapping[str, str] | None = None) -> str:
    """The child runs of a sweep's parent (MLflow's own parent tag), optionally with more tags."""
    return tags_equal({schema.PARENT: parent_id, **(tags or {})})


def sweep_parent(sweep_key: str) -> str:
    """The parent runs of the sweep with this key (the same command run again)."""
    return tags_equal({schema.SWEEP_KEY: sweep_key})


def baseline_runs(fingerprint: str, split_key: str) -> str:
    """Baseline runs on this data and this exact split (hold-out or one fold)."""
    return tags_equal(
        {
            schema.MODEL_KIND: "baseline",
            schema.DATA_FINGERPRINT: fingerprint,
            schema.SPLIT_KEY: split_key,
        }
    )


def baseline_folds(fingerprint: str, folds_key: str) -> str:
    """Baseline runs on this data over these folds (any fold of them)."""
    return tags_equal(
        {
            schema.MODEL_KIND: "baseline",
            schema.DATA_FINGERPRINT: fingerprint,
            schema.FOLDS_KEY: folds_key,
        }
    )


def config_runs(cv_key: str) -> str:
    """Runs of one config on its data, whatever their split (its CV folds and final fit)."""
    return tags_equal({schema.CV_KEY: cv_key})


def model_named(name: str) -> str:
    """The versions of the registered model `name`."""
    return check_model_filter(f"name = {_quoted(name)}")


# ---------------------------------------------------------------- searches
def has_status(*statuses: str) -> Callable[[Run], bool]:
    """A client-side status filter (the workspace filters on no run attribute)."""
    return lambda run: run.info.status in statuses


def has_tag(name: str) -> Callable[[Run], bool]:
    """A client-side "has this tag" filter (the workspace has no != on tags)."""
    return lambda run: name in run.data.tags


def iter_runs(
    client: Any,
    experiment_ids: list[str],
    where: str = "",
    keep: Callable[[Run], bool] | None = None,
    page_size: int = PAGE_SIZE,
) -> Iterator[Run]:
    """Runs matching `where` (checked) and then `keep`, newest first, read a page at a time."""
    check_filter(where)
    order = check_order_by(NEWEST_FIRST)
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, where, max_results=page_size, order_by=order, page_token=token
        )
        yield from (run for run in page if keep is None or keep(run))
        token = page.token
        if not token:
            return


def search_runs(
    client: Any,
    experiment_ids: list[str],
    where: str = "",
    keep: Callable[[Run], bool] | None = None,
    limit: int | None = None,
) -> list[Run]:
    """`iter_runs` as a list, at most `limit` runs."""
    pages = iter_runs(client, experiment_ids, where, keep, min(limit or PAGE_SIZE, PAGE_SIZE))
    return list(islice(pages, limit))


def first_run(
    client: Any,
    experiment_ids: list[str],
    where: str = "",
    keep: Callable[[Run], bool] | None = None,
) -> Run | None:
    """The newest run matching `where` and `keep`, if any."""
    return next(iter_runs(client, experiment_ids, where, keep), None)


def model_versions(client: Any, name: str) -> list[ModelVersion]:
    """Every version of the registered model `name`, read a page at a time."""
    where, versions, token = model_named(name), [], None
    while True:
        page = client.search_model_versions(where, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions
