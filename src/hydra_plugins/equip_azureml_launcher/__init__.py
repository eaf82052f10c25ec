"""Hydra discovers launchers only under the `hydra_plugins` namespace package and instantiates only
classes defined there (hydra.core.plugins.Plugins._instantiate rejects any other `_target_`), so
`hydra/launcher=azureml` points here. The launcher itself is equip.launchers.azureml.launcher.

Hydra imports this package when it starts, before it composes a config: the Azure ML settings'
schema (equip.launchers.azureml.settings) is registered here, for conf/launch/azureml.yaml and
conf/hydra/launcher/azureml.yaml to extend."""

from equip.launchers.azureml import launcher as azureml_launch
from equip.launchers.azureml.settings import register_configs

register_configs()


class AzureMLLauncher(azureml_launch.AzureMLLauncher):
    """Every job of a sweep as an Azure ML command job; see equip.launchers.azureml.launcher."""
