"""pipeline.sweep.scheduler: the search algorithm (random or Optuna's TPE), the optional
package checked, and ASHA letting a trial at its last epoch finish."""

from __future__ import annotations

import argparse

import pytest

from pipeline.cli import main
from pipeline.config import Config, ConfigError, load_config
from pipeline.sweep import run, scheduler
from pipeline.sweep import space as sweep_space
from tests.support import ROOT
from tests.support.factories import SEARCH_SPACE

PARAMS = ROOT / "params.yaml"
SPACE = SEARCH_SPACE


def test_optuna_without_the_package_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(scheduler.importlib.util, "find_spec", lambda name: None)
    cfg = load_config([PARAMS]).replace({"sweep.search": "optuna"})
    with pytest.raises(ConfigError, match=r"pip install 'frcnn\[optuna\]'"):
        scheduler.check_search(cfg)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"frcnn\[optuna\]"):  # before anything starts
        run(cfg, argparse.Namespace(resume=False))
    assert main(["sweep", "--params", str(PARAMS), "--set", "sweep.search=optuna"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("frcnn sweep: invalid parameters: sweep.search: optuna needs the "
                          "optuna package") and "frcnn[optuna]" in err
    assert list(tmp_path.iterdir()) == []


def test_random_search_is_seeded():
    searcher = scheduler.searcher(Config().replace({"sweep.seed": 5}))
    assert type(searcher).__name__ == "BasicVariantGenerator"


def test_asha_lets_a_trial_at_its_last_epoch_finish():
    """ASHA stops a trial below the cut at a rung; one that has reported its last epoch
    (``max_t``) is never stopped: it is done training and would only lose its end."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler

    asha = scheduler.scheduler(Config().replace({"sweep.epochs": 2, "sweep.grace_period": 1,
                                                 "sweep.reduction_factor": 2,
                                                 "sweep.metric": "AR@300", "sweep.mode": "max"}))
    asha.set_search_properties("AR@300", "max")
    good, bad, last, plain = (SimpleNamespace(trial_id=t) for t in ("a", "b", "c", "d"))
    for trial in (good, bad, last, plain):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, good, {"epoch": 1, "AR@300": 0.9}) == asha.CONTINUE
    assert asha.on_trial_result(None, bad, {"epoch": 1, "AR@300": 0.1}) == asha.STOP
    # plain ASHA stops a trial at its last epoch below the cut (good's 0.9 at epoch 2) ...
    assert ASHAScheduler.on_trial_result(asha, None, good, {"epoch": 2, "AR@300": 0.9}) \
        == asha.CONTINUE
    assert ASHAScheduler.on_trial_result(asha, None, plain, {"epoch": 2, "AR@300": 0.0}) \
        == asha.STOP
    # ... the project's lets it finish
    assert asha.on_trial_result(None, last, {"epoch": 2, "AR@300": 0.0}) == asha.CONTINUE


def test_optuna_search_suggests_valid_configs():
    """sweep.search=optuna: TPE (Ray's OptunaSearch) takes the space as Tune declares it and
    every suggestion decodes to a valid config."""
    pytest.importorskip("optuna")
    cfg = Config().replace({"sweep.search": "optuna", "sweep.space": SPACE})
    searcher = scheduler.searcher(cfg)
    assert type(searcher).__name__ == "OptunaSearch"
    assert searcher.set_search_properties("AR@300", "max", sweep_space.search_space(SPACE))
    for i in range(5):
        values = sweep_space.decode(SPACE, searcher.suggest(f"t{i}"))
        assert values["anchors.scales"] in ([8, 16, 32], [4, 8, 16])
        Config().replace(values)
        searcher.on_trial_complete(f"t{i}", {"AR@300": 0.1 * i})
