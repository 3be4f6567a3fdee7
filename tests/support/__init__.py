"""Scaffolding shared by the test modules (a test module never imports another one).

- :mod:`.factories`: prepared sets in the schema of ``frcnn prepare``, params files, and the tiny
  config presets (``TINY``, ``RAY_PARAMS``, the sweep presets);
- :mod:`.datasets`: raw datasets in the PASCAL VOC and COCO layouts (what ``prepare`` reads);
- :mod:`.references`: loop-written reference maths (IoU, best IoU at budgets, VOC AP);
- :mod:`.fakes`: scripted stand-ins for the detector (the evaluation tests);
- :mod:`.procs`: the environment of the pipeline's subprocesses, and stopping them;
- :mod:`.dvc_repo`: a fresh git + DVC repository holding the project's code;
- :mod:`.mlflow_store`: looking runs and artifacts up in a store;
- :mod:`.fuzz`: counting fuzz cases, and recording the files a reader opens.

Fixtures over these (``prepared``, ``tiny_cfg``, ``one_thread``, ``dvc_repo``, ...) are in
``tests/conftest.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The project's folder (the repository root).
ROOT = Path(__file__).resolve().parents[2]
#: The virtual environment's scripts: ``frcnn``, ``dvc``, ``ray``, ``ruff``.
BIN = Path(sys.executable).parent
