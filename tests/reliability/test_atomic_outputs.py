"""No partial outputs: a stage killed or failing part-way leaves its previous outputs or none.

Fault: ``frcnn prepare`` SIGKILLed while it writes its tables; a write that fails in the middle
(disk full) of a model file (``save_model``), a Parquet / JSON / text / PNG output
(:mod:`pipeline.files`), a checkpoint folder, and the evaluate stage's reports.
Must survive: the target is the previous complete version (byte for byte) or absent, never a
half-written file; no temporary file is left beside it after a failure the process survives.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from detector.serialization import load_model, save_model
from pipeline import files, plots, storage
from pipeline.config import Config
from pipeline.modeling import build_model
from pipeline.prepare.stage import prepare_dataset
from pipeline.training import checkpoints
from tests.support.procs import kill_session, subprocess_env


class DiskFull(OSError):
    pass


def _tree(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old")))


# --------------------------------------------------------------------------------------------
# prepare, killed for real


@pytest.mark.timeout(300)
def test_prepare_killed_mid_write_leaves_the_previous_output(tmp_path):
    """SIGKILL `frcnn prepare` (and its worker processes) once its new tables are being written:
    data/prepared is still the previous complete set, every file identical."""
    cfg = Config().replace({"data.synthetic_images": 6, "data.image_size": 64,
                            "data.num_workers": 1, "data.out_dir": str(tmp_path / "data" /
                                                                        "prepared")})
    prepare_dataset(cfg, progress=False)
    out = tmp_path / "data" / "prepared"
    before = _tree(out)
    assert {"train.parquet", "val.parquet", "test.parquet", "classes.json"} <= set(before)

    bigger = cfg.replace({"data.synthetic_images": 2000, "data.image_size": 256,
                          "data.num_workers": 1, "data.out_dir": "data/prepared"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bigger.to_dict()))
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "prepare"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline, partial = time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            temps = list((tmp_path / "data").glob(".prepared.*.tmp"))
            # the table being written: its part files, gathered beside it until it is whole
            tables = [p for t in temps for p in t.glob(".train.parquet.parts/part-*.parquet")]
            with contextlib.suppress(FileNotFoundError):   # renamed between glob and stat
                if tables and tables[0].stat().st_size > 100_000:  # row groups on their way
                    partial = tables[0]
                    break
            time.sleep(0.05)
        assert partial is not None and proc.poll() is None, "prepare was not caught mid-write"
    finally:
        kill_session(proc)
    assert proc.returncode == -signal.SIGKILL
    assert _tree(out) == before  # the previous output, untouched
    assert json.loads((out / "classes.json").read_text())["images"]["train"] < 10
    assert len(pd.read_parquet(out / "train.parquet")) < 10
    # the next run succeeds whatever the killed one left behind in its temporary folder
    prepare_dataset(cfg, progress=False)
    assert _tree(out) == before


# --------------------------------------------------------------------------------------------
# writes failing half-way


def _half_then_fail(real_write):
    """A writer that writes the first half of what it should, then raises DiskFull."""
    def write(*args, **kwargs):
        real_write(*args, **kwargs)
        target = next(a for a in (*args, *kwargs.values()) if isinstance(a, (str, Path)) or
                      hasattr(a, "write"))
        if hasattr(target, "write"):
            target.flush()
            target.truncate(max(1, target.tell() // 2))
        else:
            data = Path(target).read_bytes()
            Path(target).write_bytes(data[: len(data) // 2])
        raise DiskFull(28, "No space left on device")
    return write


def test_save_model_failing_mid_write_keeps_the_previous_model(tmp_path, monkeypatch, tiny_cfg):
    model = build_model(tiny_cfg, num_classes=2, stage="rpn")
    path = save_model(tmp_path / "models" / "rpn.pt", model, classes=["a", "b"])
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _half_then_fail(torch.save))
    with pytest.raises(DiskFull):
        save_model(path, build_model(tiny_cfg, num_classes=3, stage="rpn"), classes=["x"])
    monkeypatch.undo()
    assert path.read_bytes() == before and _leftovers(path.parent) == []
    assert load_model(path)[1]["classes"] == ["a", "b"]


@pytest.mark.parametrize("kind", ["parquet", "json", "text", "png"])
def test_file_writers_failing_mid_write_keep_the_previous_file(tmp_path, monkeypatch, kind):
    old, new = pd.DataFrame({"x": [1, 2]}), pd.DataFrame({"x": list(range(10_000))})
    path = tmp_path / f"out.{kind}"
    writers = {
        "parquet": (lambda v: files.write_parquet(path, v), pd.DataFrame, "to_parquet"),
        "json": (lambda v: storage.write_json(path, {"rows": v["x"].tolist()}), Path,
                 "write_text"),
        "text": (lambda v: files.write_text(path, v.to_csv()), Path, "write_text"),
        "png": (lambda v: plots.save_image(Image.new("RGB", (len(v), 8)), path), Image.Image,
                "save"),
    }
    write, owner, method = writers[kind]
    write(old)
    before = path.read_bytes()
    monkeypatch.setattr(owner, method, _half_then_fail(getattr(owner, method)))
    with pytest.raises(DiskFull):
        write(new)
    monkeypatch.undo()
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_atomic_dir_failing_mid_fill_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "pictures"
    with files.atomic_dir(target) as tmp:
        (tmp / "a.png").write_bytes(b"old a")
    with pytest.raises(DiskFull), files.atomic_dir(target) as tmp:
        (tmp / "a.png").write_bytes(b"new a")
        raise DiskFull(28, "No space left on device")
    assert _tree(target) == {"a.png": hashlib.sha256(b"old a").hexdigest()}
    assert _leftovers(tmp_path) == []


def test_checkpoint_copy_failing_keeps_the_complete_ones(tmp_path, monkeypatch):
    store = checkpoints.LocalCheckpoints(tmp_path / "ckpt", keep=2)
    source = tmp_path / "src"
    checkpoints.write(source, {"model": {"w": torch.ones(3)}, "step": 1}, {"step": 1})
    store({"step": 1.0}, source, checkpoints.checkpoint_name(0, 1))
    assert not source.exists()  # the report owns the folder it was handed, and is done with it
    checkpoints.write(source, {"model": {"w": torch.ones(3)}, "step": 2}, {"step": 2})
    real = shutil.copytree

    def copy_half(src, dst, **kwargs):
        real(src, dst, **kwargs)
        (Path(dst) / checkpoints.PROGRESS).unlink()
        raise DiskFull(28, "No space left on device")
    monkeypatch.setattr(shutil, "copytree", copy_half)
    with pytest.raises(DiskFull):
        store({"step": 2.0}, source, checkpoints.checkpoint_name(0, 2))
    monkeypatch.undo()
    assert [p.name for p in store.checkpoints()] == ["checkpoint_e000_s0000001"]
    assert checkpoints.read_state(store.latest())["step"] == 1
    assert _leftovers(tmp_path / "ckpt") == []


def test_evaluate_reports_failing_half_way_are_each_old_or_new(tmp_path, monkeypatch):
    """The evaluate stage's outputs, written a second time with a failure after the tables and
    the curves (while drawing the pictures): every file is a complete old or new version."""
    from pipeline.evaluation.core import evaluate_model
    from pipeline.evaluation.metrics import metrics
    from pipeline.evaluation.outputs import OutputPaths, write_outputs
    from pipeline.annotations import read_ground_truth
    from tests.support.factories import write_prepared
    from tests.support.fakes import perfect_model

    classes = ["cat", "dog"]
    prepared = write_prepared(tmp_path / "prepared", splits={"test": 4, "val": 3},
                              classes=classes, content="noise")
    splits = [read_ground_truth(prepared / f"{s}.parquet", s) for s in ("test", "val")]
    paths = OutputPaths(tmp_path / "reports", tmp_path / "metrics" / "evaluate.json")

    def outputs(num_pictures: int, budgets: tuple[int, ...]):
        model = perfect_model(splits)  # one object is both: it answers what it just proposed
        res = evaluate_model(rpn_model=model, detector=model, splits=splits, budgets=budgets,
                             num_classes=2, image_size=64, batch_size=2,
                             num_pictures=num_pictures, progress=False)
        return res, metrics(res, ["test", "val"], budgets, classes)

    old_res, old_values = outputs(2, (50, 300))
    write_outputs(old_res, old_values, paths, "test", classes)
    before = _tree(tmp_path / "reports") | {"metrics": paths.metrics.read_text()}

    new_res, new_values = outputs(3, (10, 50, 300))
    drawn = []

    def fail_on_second(image, path):
        drawn.append(path)
        if len(drawn) == 2:
            raise DiskFull(28, "No space left on device")
        return real_save(image, path)
    real_save = plots.save_image
    monkeypatch.setattr(plots, "save_image", fail_on_second)
    with pytest.raises(DiskFull):
        write_outputs(new_res, new_values, paths, "test", classes)
    monkeypatch.undo()

    after = _tree(tmp_path / "reports")
    assert json.loads(paths.metrics.read_text()) == old_values  # written last: still the old
    assert {k: v for k, v in after.items() if k.startswith("pictures")} == \
        {k: v for k, v in before.items() if k.startswith("pictures")}  # folder swapped whole
    table = pd.read_parquet(paths.recall_table)  # tables: complete new versions
    assert sorted(set(table["budget"])) == [-2, -1, 10, 50, 300]
    assert len(pd.read_parquet(paths.recall_summary)) > 0
    for name in ("recall_vs_iou.png", "recall_vs_proposals.png"):
        with Image.open(paths.plots / name) as img:
            img.load()
    for folder in (paths.reports, paths.plots, paths.metrics.parent):
        assert _leftovers(folder) == []

