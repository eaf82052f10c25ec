"""The CV-fold ensemble's pyfunc as an MLflow models-from-code file: MLflow runs it to load the
model (no pickled object: equip.serve.pyfunc says why)."""

from mlflow.models import set_model

from equip.serve.ensemble_pyfunc import EnsembleClassifierModel

set_model(EnsembleClassifierModel())
