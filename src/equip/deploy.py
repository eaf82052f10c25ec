"""Deploy a registered model:

    python -m equip.deploy target=azureml [model=models:/equip-gear@champion] [endpoint=NAME]
        [instance_type=Standard_DS3_v2] [instance_count=1] [traffic=100] [dry_run=true]
        [tracking.config_path=config.json]
    python -m equip.deploy target=local [model=URI] [port=N] [host=H]

target=azureml makes the model a managed online endpoint of the Azure ML workspace named by
tracking.config_path (or tracking.subscription_id, tracking.resource_group,
tracking.workspace_name): Azure ML serves the MLflow model as it is, no scoring script. The
champion (models:/NAME@champion) is the version tagged equip.champion=true in the workspace's
registry (tracking.uri: another MLflow registry). The scoring URL is printed with the command
that fetches the key; the key itself never is. dry_run=true writes endpoint.yaml and
deployment.yaml into folder= (default deploy/), checked with the SDK's own loaders, offline.
target=local opens the web app (python -m equip.app) on the same model.
Options are key=value pairs, like python -m equip.predict's.
"""

from __future__ import annotations

import sys

from equip.errors import EquipError
from equip.launchers.azureml import endpoint_spec
from equip.launchers.azureml.endpoint_spec import DEFAULTS as DEFAULTS  # its keys, for the docs
from equip.terminal import fail, fail_if_refused, printed_help


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if printed_help(args, __doc__):
        return 0
    try:
        cfg = endpoint_spec.parse(args)
        if cfg.target == "local":
            from equip.app import main as app  # the web app, on the same model

            return app(endpoint_spec.local_app_args(cfg))
        from equip.launchers.azureml.endpoint_service import deploy

        return deploy(cfg)
    except EquipError as e:
        fail(str(e), 2)
    except Exception as e:
        fail_if_refused(e)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
