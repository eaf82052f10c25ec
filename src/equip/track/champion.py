"""The champion of a registered model, marked by a version tag on every store.

An Azure ML workspace's registry has no aliases (Microsoft's support matrix for managing models
with MLflow lists none), so `models:/NAME@champion` cannot be relied on. The champion is instead
the version tagged `equip.<alias>=true` (`schema.champion_tag`), found by listing the model's
versions (a search by name, which the workspace supports) and loaded as `models:/NAME/VERSION`.
The same requests go to every store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from equip.errors import EquipError
from equip.track import queries, schema
from equip.track.redaction import strip_secrets

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


def score_of(version: ModelVersion) -> float:
    """The score the gate ranked the version by (versions from before it was recorded: -inf)."""
    return float(version.tags.get(schema.SCORE, "-inf"))


def _rank(version: ModelVersion) -> tuple[float, int]:
    return score_of(version), int(version.version)


def _tagged(client: Any, name: str, alias: str) -> list[ModelVersion]:
    tag = schema.champion_tag(alias)
    return [v for v in queries.model_versions(client, name) if v.tags.get(tag) == "true"]


def current(client: Any, name: str, alias: str) -> ModelVersion | None:
    """The champion: the best tagged version (by score, then version; while two gates crown at
    once, more than one may be tagged for a moment)."""
    return max(_tagged(client, name, alias), key=_rank, default=None)


def crown(client: Any, name: str, alias: str, version: str) -> bool:
    """Make `version` the champion; True when it still is once the tags are settled.

    Two gates may crown at once and there is no transaction across requests, so each sets its
    own tag first, then lists the tagged versions and untags all but the best (`settle`).
    Whatever the interleaving, exactly one stays tagged: no list ever ranks anything above the
    best of them, so its tag is never removed; any other one is removed by its own list (made
    after the best was tagged) or by the best one's (made after it was tagged)."""
    client.set_model_version_tag(name, version, schema.champion_tag(alias), "true")
    return str(settle(client, name, alias).version) == str(version)


def settle(client: Any, name: str, alias: str) -> ModelVersion:
    """Untag every tagged version but the best; returns the best (see `crown`)."""
    from mlflow.exceptions import MlflowException

    tagged = _tagged(client, name, alias)
    best = max(tagged, key=_rank)
    for other in tagged:
        if other.version == best.version:
            continue
        try:
            client.delete_model_version_tag(name, other.version, schema.champion_tag(alias))
        except MlflowException as e:  # the other gate removed it first
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    return best


def champion_uri(client: Any, name: str, alias: str) -> str:
    """`models:/NAME/VERSION` of the champion (what `models:/NAME@ALIAS` means in equip)."""
    found = current(client, name, alias)
    if found is None:
        where = strip_secrets(client.tracking_uri)
        raise EquipError(
            f"models:/{name}@{alias}: no version of registered model {name!r} is tagged "
            f"{schema.champion_tag(alias)}=true in {where}; register one with "
            "registry.enabled=true, or give models:/NAME/VERSION."
        )
    return f"models:/{name}/{found.version}"
