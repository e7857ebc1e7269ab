"""The code file of the registered pyfunc (MLflow "models from code"): loading the model runs this, no pickle."""

import mlflow.models

from rr.tracking.pyfunc import UnlearnedModel

mlflow.models.set_model(UnlearnedModel())
