"""Configuration: what a run's composed Hydra config may hold, checked before anything trains.

`schema` types every config group (dataclasses in Hydra's ConfigStore, their choices the Enums
of `choices`, so Hydra rejects a wrong type or choice while composing); `checks` holds the range
and cross-key checks and refuses unknown keys; `explain` turns a schema error into equip's one
line; `resources` checks what the machine must provide (disk for the decoded images, the
hardware asked for).
"""
