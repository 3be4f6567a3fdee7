"""The evaluate stage (``frcnn evaluate``): proposal recall of the RPN, detection mAP.

:mod:`.core` scores models on prepared splits (:func:`evaluate_model`, also used by the sweep's
trials); :mod:`.recall` and :mod:`.voc_ap` are the metrics' maths; :mod:`.metrics` names and
summarises them; :mod:`.outputs` writes the reports; :mod:`.stage` is the stage's driver.
Recall counts ``difficult`` boxes (see :mod:`.recall`); mAP ignores them.
"""

from __future__ import annotations

import argparse

from pipeline.config import Config


def run(cfg: Config, args: argparse.Namespace | None = None) -> int:
    """``frcnn evaluate``: see :func:`pipeline.evaluation.stage.evaluate_stage`."""
    from pipeline.evaluation.stage import evaluate_stage

    evaluate_stage(cfg)
    return 0
