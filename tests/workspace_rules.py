"""What an Azure ML workspace refuses among the MLflow requests it otherwise serves.

Read from Microsoft's two support matrices ("Query & compare experiments and runs with MLflow" ->
Support matrix for querying runs and experiments; "Manage model registries in Azure Machine
Learning with MLflow" -> Support matrix for managing models with MLflow; summarised in
docs/azureml-workspace.md). Requests the matrices rule out are answered 400 with an MLflow error
body. Routes a workspace does not implement at all (MLflow 3's logged models) are answered the way a
real workspace answers them: 404 with an empty body (Azure/azure-sdk-for-python#44896).

Filters are parsed with MLflow's own search grammar (sqlparse underneath), so what is checked is
what the server would run, not a pattern over the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NUMERIC = {"=", "!=", "<", "<=", ">", ">="}
RUN_ORDER_FIELDS = {"start_time", "end_time"}  # "run fields": the only order a workspace keeps
# Registry routes absent from the model matrix, or marked "registered models are immutable".
REFUSED_ROUTES = {
    "registered-models/alias": "model aliases (set, get or delete an alias, models:/NAME@ALIAS)",
    "registered-models/delete": "deleting a registered model (registered models are immutable)",
    "registered-models/rename": "renaming a registered model (registered models are immutable)",
    "experiments/update": "renaming an experiment",
}
NOT_IMPLEMENTED = ("logged-models",)  # MLflow 3: create/search/get/finalize logged models


@dataclass(frozen=True)
class Refusal:
    status: int  # 400: ruled out by the matrix; 404: a route the workspace does not have
    reason: str


def refusal(method: str, route: str, request: dict[str, Any]) -> Refusal | None:
    """Why the workspace refuses `method route` (route: after /api/2.0/mlflow/, e.g.
    'runs/search'; `request`: its JSON body or query), or None when it serves it."""
    if route.split("/")[0] in NOT_IMPLEMENTED:
        return Refusal(404, "MLflow 3 logged-model APIs are not implemented")
    if route in REFUSED_ROUTES:
        return Refusal(400, f"{REFUSED_ROUTES[route]} is not supported")
    reasons: list[str | None] = []
    if route == "runs/search":
        reasons = [
            run_filter_refusal(request.get("filter") or ""),
            order_refusal(request.get("order_by") or []),
        ]
    elif route == "registered-models/search":
        reasons = [registry_filter_refusal(request.get("filter") or "", ("name",))]
    elif route == "model-versions/search":
        reasons = [registry_filter_refusal(request.get("filter") or "", ("name", "run_id"))]
    found = [r for r in reasons if r]
    return Refusal(400, "; ".join(found)) if found else None


def escaped_names(filter_string: str) -> list[str]:
    """The names in a filter written with backticks or double quotes (`metrics.\\`a b\\``)."""
    import sqlparse
    from sqlparse.sql import Comparison

    statement = sqlparse.parse(filter_string)[0]
    lefts = [t.left.value for t in statement.tokens if isinstance(t, Comparison)]
    return [name for name in lefts if "`" in name or '"' in name]


def _clauses(filter_string: str, parse) -> tuple[list[dict], list[str]]:
    """MLflow's parse of the filter, and what in its form the workspace cannot run."""
    import sqlparse
    from mlflow.exceptions import MlflowException

    words = {t.normalized for t in sqlparse.parse(filter_string)[0].flatten() if t.is_keyword}
    if "OR" in words:
        return [], ["OR in a filter is not supported"]
    problems = []
    if escaped := escaped_names(filter_string):
        problems.append(f"names that need escaping are not supported ({', '.join(escaped)})")
    try:
        return parse(filter_string), problems
    except MlflowException as e:
        return [], [*problems, f"not a valid filter ({e.message})"]


def run_filter_refusal(filter_string: str) -> str | None:
    from mlflow.utils.search_utils import SearchUtils

    if not filter_string.strip():
        return None
    clauses, problems = _clauses(filter_string, SearchUtils.parse_search_filter)
    for c in clauses:
        kind, op, key = c["type"], c["comparator"].upper(), c["key"]
        if kind not in ("metric", "parameter", "tag"):
            problems.append(
                f"filtering runs by run fields or attributes is not supported ({kind} {key})"
            )
        elif op in ("LIKE", "ILIKE"):
            problems.append(f"{op} is not supported ({kind} {key})")
        elif kind == "tag" and op != "=":
            problems.append(f"{op} on tags is not supported (tag {key})")
        elif kind == "parameter" and op not in ("=", "!="):
            problems.append(f"{op} on params is not supported (param {key})")
        elif kind == "metric" and op not in NUMERIC:
            problems.append(f"{op} on metrics is not supported (metric {key})")
    return "; ".join(problems) or None


def order_refusal(order_by: list[str]) -> str | None:
    from mlflow.utils.search_utils import SearchUtils

    for clause in order_by:
        kind, key, _ = SearchUtils.parse_order_by_for_search_runs(clause)
        if kind != "attribute" or key not in RUN_ORDER_FIELDS:
            return f"ordering runs by {clause!r} is not supported (only start_time, end_time)"
    return None


def registry_filter_refusal(filter_string: str, fields: tuple[str, ...]) -> str | None:
    """Registered models are searched by name only (no LIKE, no tags); versions likewise, by
    name or run id (the matrix lists no other search of versions). MLflow 3's client adds
    a filter on the tag mlflow.prompt.is_prompt (in backticks) to every registered-model search:
    refused too."""
    from mlflow.utils.search_utils import SearchModelVersionUtils

    if not filter_string.strip():
        return None
    clauses, problems = _clauses(filter_string, SearchModelVersionUtils.parse_search_filter)
    allowed = " or ".join(f"{f} =" for f in fields)
    for c in clauses:
        if c["type"] != "attribute" or c["key"] not in fields or c["comparator"] != "=":
            what = f"{c['type']} {c['key']} {c['comparator']}"
            problems.append(f"only {allowed} is supported, not {what}")
    return "; ".join(problems) or None
