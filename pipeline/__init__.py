"""The experiment pipeline: stages (prepare, train, evaluate, sweep, predict), config, tracking.

Owns everything that touches Ray, MLflow and DVC; the model itself is in :mod:`detector`.
"""
