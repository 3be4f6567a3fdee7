"""How a sweep searches and stops trials: the search algorithm and the ASHA scheduler.

Search: ``sweep.search`` ``random`` (Tune's random search, seeded by ``sweep.seed``) or
``optuna`` (TPE; ``pip install 'frcnn[optuna]'``). Scheduler: ASHA on ``sweep.metric`` /
``sweep.mode`` by epoch, ``max_t = sweep.epochs``, ``sweep.grace_period``,
``sweep.reduction_factor``; a trial that has reported its last epoch is left to finish.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from pipeline.config import Config
from pipeline.errors import ConfigError


def check_search(cfg: Config) -> None:
    """``sweep.search: optuna`` needs the optional ``optuna`` package."""
    if cfg.sweep.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search: optuna needs the optuna package, which is not "
                          "installed: pip install 'frcnn[optuna]' (or use sweep.search=random)")


class LetLastEpochFinish(ASHAScheduler):
    """ASHA that never stops a trial which has reported its last epoch (``max_t``): it is done
    training, and stopping it would only lose its end (its model, its finished mark).

    Keeps its own copies of ``time_attr`` and ``max_t`` (ASHA's are private attributes).
    """

    def __init__(self, *, time_attr: str, max_t: int, **asha: Any) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, **asha)
        self.last_epoch_attr, self.last_epoch = time_attr, max_t

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self.last_epoch_attr, 0) >= self.last_epoch:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def scheduler(cfg: Config) -> LetLastEpochFinish:
    return LetLastEpochFinish(time_attr="epoch", max_t=cfg.sweep.epochs,
                              grace_period=min(cfg.sweep.grace_period, cfg.sweep.epochs),
                              reduction_factor=cfg.sweep.reduction_factor,
                              stop_last_trials=False)


def searcher(cfg: Config) -> Any:
    if cfg.sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        return OptunaSearch(seed=cfg.sweep.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(random_state=cfg.sweep.seed)
