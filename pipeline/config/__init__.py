"""One typed, validated configuration for every stage.

``params.yaml`` (plus overlays) and ``--set section.key=value`` overrides become one frozen
:class:`Config` (:func:`load_config`), checked before any work starts; modules further down take
plain keyword arguments, and nothing reads the config with ``.get(key, default)``.
:mod:`.schema` declares the sections, :mod:`.load` reads and builds, :mod:`.validate` checks,
:mod:`.tree` handles nested dicts.
"""

from pipeline.config.load import describe, load_config, parse_override
from pipeline.config.schema import (AnchorConfig, BackboneConfig, Config, DataConfig, EvalConfig,
                                    RPNConfig, RoIConfig, SweepConfig, TrackingConfig,
                                    TrainConfig, from_dict)
from pipeline.config.tree import flatten
from pipeline.errors import ConfigError

__all__ = ["AnchorConfig", "BackboneConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
           "RPNConfig", "RoIConfig", "SweepConfig", "TrackingConfig", "TrainConfig", "describe",
           "flatten", "from_dict", "load_config", "parse_override"]
