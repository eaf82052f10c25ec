"""`python -m equip.champion NAME`: print `models:/NAME/VERSION` of the registered model's
champion, for tools that take a model URI, e.g.

    mlflow models serve -m "$(python -m equip.champion equip-gear)" --env-manager local -p 5001

equip marks the champion with a version tag, not an alias (an Azure ML workspace's registry has
none), so `models:/NAME@champion` means it only to equip's own commands; this is the same on
every store (equip.track.champion).
"""

from __future__ import annotations

import argparse

from equip.errors import EquipError
from equip.terminal import fail
from equip.track import store
from equip.track.champion import champion_uri


def main(argv: list[str] | None = None) -> int:
    """0 with the URI printed, 2 with one line when there is no champion or no store."""
    ap = argparse.ArgumentParser(
        prog="python -m equip.champion",
        description="Print models:/NAME/VERSION of a registered model's champion.",
    )
    ap.add_argument("name", help="the registered model (registry.name), e.g. equip-gear")
    ap.add_argument("--alias", default="champion", help="registry.alias (default: champion)")
    ap.add_argument(
        "--tracking-uri",
        default=None,
        help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder",
    )
    args = ap.parse_args(argv)
    try:
        from mlflow import MlflowClient

        uri = store.open_given(args.tracking_uri, "--tracking-uri", "register a model first")
        print(champion_uri(MlflowClient(uri), args.name, args.alias))
    except EquipError as e:
        fail(str(e), 2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
