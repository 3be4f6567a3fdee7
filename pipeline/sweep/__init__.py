"""The sweep (``frcnn sweep [--resume]``): Ray Tune over the anchor and sampling parameters.

:mod:`.driver` runs the search (:func:`sweep`); :mod:`.trial` is one trial (a Tune function
trainable running the RPN loop itself, or, with several workers, fitting a Ray Train run of it);
:mod:`.space` the search space and each
trial's config; :mod:`.data` the trials' tables; :mod:`.scheduler` search and early stopping;
:mod:`.report` the outputs (trial table, best params overlay, plot).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import Config


def run(cfg: Config, args: argparse.Namespace) -> int:
    """``frcnn sweep [--resume]``: see :func:`pipeline.sweep.driver.sweep`. Sweep settings that
    the config cannot check alone are checked before anything starts."""
    from pipeline.sweep.driver import sweep
    from pipeline.sweep.scheduler import check_search
    from pipeline.sweep.space import check

    from pipeline.redaction import redact
    from pipeline.sweep.driver import experiment_path

    check(cfg)
    check_search(cfg)
    try:
        sweep(cfg, resume=bool(getattr(args, "resume", False)))
    except KeyboardInterrupt:
        print(f"frcnn sweep: interrupted; `frcnn sweep` (same parameters) continues it from "
              f"{redact(experiment_path(cfg))}", file=sys.stderr, flush=True)
        raise
    return 0
