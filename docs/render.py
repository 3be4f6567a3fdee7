"""Regenerate the pictures of the README from a finished pipeline run: ``make docs``.

Run in the project folder after ``make run`` (or ``dvc repro``). Copies into ``docs/``:

- ``recall_vs_iou.png`` and ``recall_vs_proposals.png`` (``reports/plots/``, the evaluate stage);
- ``test_picture.png``: the first of ``reports/pictures/`` (ground truth green, proposals blue,
  detections red);
- ``sweep.png`` (``reports/sweep.png``, the sweep's metric per trial over epochs);

and takes ``mlflow_compare.png``, a screenshot of the MLflow UI comparing the sweep's trials
(and ``mlflow_runs.png``, the experiment's run table): an ``mlflow server`` on 127.0.0.1 over
the run's store, looked at by headless Chromium (Debian's ``chromium`` package:
``apt-get install chromium``), both started and stopped here. Nothing is downloaded.

Usage: ``python docs/render.py [--store sqlite:///mlflow.db] [--chromium /usr/bin/chromium]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COPIES = {"recall_vs_iou.png": "reports/plots/recall_vs_iou.png",
          "recall_vs_proposals.png": "reports/plots/recall_vs_proposals.png",
          "sweep.png": "reports/sweep.png"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _screenshot(chromium: str, url: str, out: Path, *, wait_ms: int = 20000) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-quic", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars",
                        "--window-size=1900,1000", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)


def _mlflow_pictures(store: str, chromium: str) -> list[Path]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server",
                               "--backend-store-uri", store, "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True,
                              env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        experiment = _api(url, "experiments/get-by-name?experiment_name=frcnn")["experiment"]
        eid = experiment["experiment_id"]
        runs = _api(url, "runs/search", {"experiment_ids": [eid], "max_results": 1000})["runs"]
        trials = [r["info"]["run_id"] for r in runs
                  if any(t["key"] == "trial_id" for t in r["data"].get("tags", []))]
        written = [DOCS / "mlflow_runs.png", DOCS / "mlflow_compare.png"]
        _screenshot(chromium, f"{url}/#/experiments/{eid}/runs", written[0])
        _screenshot(chromium, f"{url}/#/compare-runs?runs={json.dumps(trials)}"
                              f"&experiments={json.dumps([eid])}", written[1])
        return written
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    missing = [src for src in COPIES.values() if not (ROOT / src).is_file()]
    pictures = sorted((ROOT / "reports" / "pictures").glob("*.png"))
    if missing or not pictures:
        print(f"docs/render.py: run `make run` first (missing: {missing or 'reports/pictures'})",
              file=sys.stderr)
        return 1
    for name, src in COPIES.items():
        shutil.copyfile(ROOT / src, DOCS / name)
    shutil.copyfile(pictures[0], DOCS / "test_picture.png")
    written = [DOCS / n for n in [*COPIES, "test_picture.png"]]
    if not Path(args.chromium).is_file():
        print(f"docs/render.py: no Chromium at {args.chromium}: the MLflow screenshots are "
              f"left as they are (apt-get install chromium)", file=sys.stderr)
    else:
        written += _mlflow_pictures(args.store, args.chromium)
    for path in written:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
