"""The code MLflow logs with the policy's pyfunc model ("models from code", instead of a pickled object): loading
the model runs this file, which names :class:`detoxflow.tracking.pyfunc.PolicyModel` as the model."""

from mlflow.models import set_model

from detoxflow.tracking.pyfunc import PolicyModel

set_model(PolicyModel())
