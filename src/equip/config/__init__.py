"""Configuration: what a run's composed Hydra config may hold, checked before anything trains.

Range and cross-key checks live here (`checks`), so a bad value stops a single run or a whole
sweep with one line that names the key and the fix.
"""
