"""The code MLflow runs to build a registered rcl_dist denoiser ("models from code").

:func:`rcl_dist.registry.register` logs this file as the pyfunc's ``python_model`` (a path, not an
object), so MLflow stores it as source (``code/registry_model.py``) and no pickle of the model class
(no ``python_model.pkl``): loading a registered model runs this file and imports
:class:`rcl_dist.serving.DenoiserModel` from the shipped ``code/rcl_dist``; nothing is unpickled. The
tile and overlap defaults come in as the model config (``context.model_config``).

Only MLflow imports this file (by path); importing it elsewhere would set MLflow's current model.
"""

import mlflow

from rcl_dist.serving import DenoiserModel

mlflow.models.set_model(DenoiserModel())
