"""equip: config-driven CNN experiments on equipment photos, tracked in MLflow."""

import os

# OpenMP threads that spin between parallel regions collapse when anything else wants the cores
# (another sweep, a browser, CI): a training step on 2 cores with one kept busy took 14x longer
# spinning than sleeping (bench/omp_wait.py). Read once, when torch loads, so set before that;
# a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
