"""equip: config-driven CNN experiments on equipment photos, tracked in MLflow."""

import os

# OpenMP threads that spin between parallel regions collapse when anything else wants the cores
# (another sweep, a browser, CI): a training step on 2 cores with one kept busy took 14x longer
# spinning than sleeping (bench/omp_wait.py). Read once, when torch loads, so set before that;
# a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# MLflow's own lines are not the user's: its INFO lines (a new store's table creation) and the
# "Downloading artifacts" progress bars that every model save and load prints. MLflow's own
# settings, so MLFLOW_LOGGING_LEVEL=INFO or MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true in the
# environment bring them back. The level is read when mlflow is imported; the bar at each use.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# ONNX Runtime (1.32) uploads usage events to mobile.events.data.microsoft.com about 30 s after
# its first session, from a training that logs a model or a served one. Only this variable,
# read when its environment is created, stops it: `disable_telemetry_events()` does not
# (tests/test_inference.py watches through a proxy).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
