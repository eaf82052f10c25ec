"""equip's joblib launcher for Hydra (`hydra/launcher=joblib`); the work is in
equip.launchers.processes.

Hydra instantiates launchers only from the `hydra_plugins` namespace package and imports every
module in it at start-up, so this package holds the thin plugin class and imports nothing heavy.
"""
