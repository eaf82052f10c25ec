"""Hydra discovers launchers only under the `hydra_plugins` namespace package and instantiates only
classes defined there (hydra.core.plugins.Plugins._instantiate rejects any other `_target_`), so
`hydra/launcher=azureml` points here. The launcher itself is equip.launchers.azureml.launcher."""

from equip.launchers.azureml import launcher as azureml_launch


class AzureMLLauncher(azureml_launch.AzureMLLauncher):
    """Every job of a sweep as an Azure ML command job; see equip.launchers.azureml.launcher."""
