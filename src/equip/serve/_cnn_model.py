"""The CNN's pyfunc as an MLflow models-from-code file: MLflow runs it to load the model."""

from mlflow.models import set_model

from equip.serve.pyfunc import ImageClassifierModel

set_model(ImageClassifierModel())
