"""The experiment pipeline: stages (prepare, train, evaluate, sweep, predict), config, tracking.

Owns everything that touches Ray, MLflow and DVC; the model itself is in :mod:`detector`.

MLflow's usage telemetry is off unless the environment says otherwise
(``MLFLOW_DISABLE_TELEMETRY=false``): the pipeline runs on clusters that may have no internet,
and nothing here should phone home unasked (Ray's usage stats are off likewise for the local
clusters it starts). Set here, before any stage imports MLflow, in the driver and in every Ray
worker that imports a stage.
"""

import os as _os

_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
