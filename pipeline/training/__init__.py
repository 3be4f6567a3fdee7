"""The training stages (``frcnn train --stage rpn|frcnn``): Ray Train driver, worker loop, data.

:mod:`.driver` runs a stage on a Ray Train worker group (:func:`train_stage`); every worker runs
:func:`pipeline.training.loop.train` (:mod:`.loop`, Ray-free: tests and benchmarks call it
directly) on its shard (:mod:`.loader`), with the optimiser of :mod:`.schedule`, checkpoints of
:mod:`.checkpoints`, memory checks of :mod:`.memory`; :mod:`.ray_worker` is the Ray side of a
worker (shared with the sweep's trials) and :mod:`.resume` finds an interrupted run again.
"""

from __future__ import annotations

import argparse

from pipeline.config import Config


def run(cfg: Config, args: argparse.Namespace) -> int:
    """``frcnn train --stage rpn|frcnn``: see :func:`pipeline.training.driver.train_stage`."""
    from pipeline.training.driver import train_stage

    train_stage(cfg, args.stage)
    return 0
