"""Hydra imports every module under the `hydra_plugins` namespace before it composes a config
(its own plugins register their configs this way), so importing this one stores equip's config
schemas (equip.config.schema) in the ConfigStore: for train.py, the compose API, the benches and
the sweep callback alike, with nothing to import first."""

from equip.config.schema import register

register()
