"""Truncated, corrupt and hostile model and checkpoint files; ``weights_only`` everywhere.

Fault: a model or checkpoint file cut in half (a copy interrupted, a full disk), random bytes,
an empty file, or a pickle that would run code when loaded without ``weights_only``.
Must survive: every reader (``detector.serialization.load_model``, the training checkpoint reader
``pipeline.training.checkpoints.read_state`` / ``read_progress``, the train driver's resume and RPN
checks, ``frcnn evaluate`` and ``frcnn predict``) reports the file by name with a clear error
(``ValueError``; exit code 1 and no traceback on the command line), never loads half a file and
never executes what a pickle asks for. Every ``torch.load`` in ``detector/`` and ``pipeline/``
passes ``weights_only=True``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.serialization import load_model, save_model
from pipeline.cli import main
from pipeline.modeling import build_model
from pipeline.digests import file_digest
from pipeline.training import checkpoints, resume
from tests.support import ROOT
from tests.support.factories import RAY_PARAMS, tiny_cfg, write_params, write_prepared


class _Exploit:
    """Unpickling this runs ``touch <marker>`` unless the loader refuses arbitrary callables."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    model = build_model(tiny_cfg(), num_classes=2, stage="frcnn")
    return save_model(tmp_path_factory.mktemp("model") / "frcnn.pt", model,
                      classes=["class1", "class2"])


def _corruptions(good: Path, folder: Path) -> dict[str, Path]:
    """The same file cut in half, cut to 100 bytes, random bytes, empty, and an exploit."""
    data = good.read_bytes()
    variants = {"half": data[:len(data) // 2], "head": data[:100],
                "random": np.random.default_rng(0).bytes(4096), "empty": b""}
    out = {}
    for name, content in variants.items():
        out[name] = folder / f"{name}.pt"
        out[name].write_bytes(content)
    out["exploit"] = folder / "exploit.pt"
    torch.save({"state_dict": {}, "config": {}, "meta": _Exploit(folder / "PWNED")}, out["exploit"])
    return out


def test_every_torch_load_passes_weights_only_true():
    """Source check: each ``torch.load(...)`` call in detector/ and pipeline/ has the keyword
    ``weights_only=True`` (literally), and nothing there unpickles by other means."""
    calls = []
    for path in sorted([*ROOT.glob("detector/**/*.py"), *ROOT.glob("pipeline/**/*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "torch":
                keywords = {k.arg: k.value for k in node.keywords}
                flag = keywords.get("weights_only")
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}",
                              isinstance(flag, ast.Constant) and flag.value is True))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle", "joblib"} & set(names), \
                    f"{path.relative_to(ROOT)}:{node.lineno} imports an unpickler"
    assert calls, "no torch.load found: the check is looking in the wrong place"
    assert [where for where, ok in calls if not ok] == []


def test_load_model_names_a_truncated_or_corrupt_file(good_model, tmp_path):
    model, meta = load_model(good_model)  # the intact file loads
    assert meta["classes"] == ["class1", "class2"]
    for name, path in _corruptions(good_model, tmp_path).items():
        with pytest.raises(ValueError) as caught:
            load_model(path)
        assert str(path) in str(caught.value), name
        assert "truncated or corrupt" in str(caught.value) or "not a detector" in str(caught.value)
    assert not (tmp_path / "PWNED").exists()  # weights_only refused to call os.system


def test_training_checkpoint_reader_names_a_truncated_or_corrupt_file(good_model, tmp_path):
    folder = tmp_path / "checkpoint_e001_s0000003"
    checkpoints.write(folder, {"model": {"w": torch.ones(1000)}, "step": 3, "epoch": 1,
                               "epoch_step": 0, "history": []}, {"step": 3, "epoch": 1})
    assert checkpoints.read_state(folder)["step"] == 3
    state = (folder / checkpoints.TRAIN_STATE).read_bytes()
    for name, content in {"half": state[: len(state) // 2], "random": os.urandom(512),
                          "empty": b""}.items():
        (folder / checkpoints.TRAIN_STATE).write_bytes(content)
        with pytest.raises(ValueError, match="truncated or corrupt") as caught:
            checkpoints.read_state(folder)
        assert str(folder / checkpoints.TRAIN_STATE) in str(caught.value), name
    torch.save({"model": _Exploit(tmp_path / "PWNED")}, folder / checkpoints.TRAIN_STATE)
    with pytest.raises(ValueError, match=checkpoints.TRAIN_STATE):
        checkpoints.read_state(folder)
    assert not (tmp_path / "PWNED").exists()

    (folder / checkpoints.PROGRESS).write_text('{"step": 3, "epo')  # cut short
    with pytest.raises(ValueError, match="truncated or corrupt checkpoint progress") as caught:
        checkpoints.read_progress(folder)
    assert str(folder / checkpoints.PROGRESS) in str(caught.value)


def test_train_driver_names_a_corrupt_resume_state_before_ray(tmp_path):
    """The driver's view of a run folder: Ray's record of its checkpoints cut short is named
    (a checkpoint's progress cut short: ``test_train_rpn_on_two_ray_workers``); a cut-short run
    state (written by the driver, killed mid-write) is ignored."""
    run = tmp_path / "train_rpn-abc"
    (run / "checkpoint_e000_s0000002").mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text('{"latest_checkpoint_result": {"chec')
    with pytest.raises(ValueError, match="unreadable.*delete .*train_rpn-abc"):
        resume.latest_checkpoint(str(tmp_path), "train_rpn-abc")
    (run / resume.RUN_STATE).write_text('{"mlflow_run_id": "12')
    assert resume.read_run_state(str(tmp_path), "train_rpn-abc") == {}


def _project(tmp_path: Path) -> Path:
    write_prepared(tmp_path / "data" / "prepared", size=64, num_images=6)
    (tmp_path / "params.yaml").write_text("data:\n  image_size: 64\n")
    return tmp_path


def test_train_frcnn_names_a_corrupt_rpn_model_before_ray(tmp_path, good_model, monkeypatch,
                                                         capsys):
    project = _project(tmp_path)
    corrupt = _corruptions(good_model, tmp_path)["half"]
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["train", "--stage", "frcnn", "--set", f"train.rpn_model={corrupt}"]) == 1
    err = capsys.readouterr().err
    assert f"{corrupt}: the RPN model (train.rpn_model) is not readable, truncated or corrupt" \
        in err and "Traceback" not in err
    import ray
    assert not ray.is_initialized()


def test_evaluate_and_predict_commands_name_a_corrupt_model(tmp_path, good_model, monkeypatch,
                                                           capsys):
    project = _project(tmp_path)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    image = project / "photo.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    for name, corrupt in _corruptions(good_model, tmp_path).items():
        assert main(["evaluate", "--set", f"train.rpn_model={corrupt}",
                     "--set", f"train.frcnn_model={good_model}"]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith(f"frcnn evaluate: {corrupt}: ") and "Traceback" not in err, err
        assert main(["predict", str(image), "--model", str(corrupt)]) == 1, name
        captured = capsys.readouterr()
        assert captured.err.startswith(f"frcnn predict: {corrupt}: ") and captured.out == ""
        assert "Traceback" not in captured.err
    assert not (tmp_path / "PWNED").exists()


def test_train_names_a_corrupt_checkpoint_to_resume_from_before_ray(tmp_path, monkeypatch,
                                                                   capsys):
    """A killed run left a checkpoint whose train_state.pt is cut short: the rerun names it
    (and how to start afresh) instead of failing in every worker of every Ray restart."""
    from pipeline.config import Config

    project = _project(tmp_path)
    cfg = Config().replace(RAY_PARAMS)
    write_params(project / "params.yaml", RAY_PARAMS)
    key = resume.run_key(cfg, "rpn", file_digest(project / "data" / "prepared" / "train.parquet"),
                         None)
    run = project / "checkpoints" / f"train_rpn-{key}"
    folder = run / "checkpoint_e000_s0000002"
    checkpoints.write(folder, {"model": {"w": torch.ones(1000)}, "step": 2}, {"epoch": 0, "step": 2})
    state = folder / checkpoints.TRAIN_STATE
    state.write_bytes(state.read_bytes()[:300])
    # what Ray Train's record names as the latest (read for real: test_train_rpn_on_two_ray_workers)
    from pipeline.training import driver
    monkeypatch.setattr(driver, "latest_checkpoint", lambda root, name: (
        (str(folder), checkpoints.read_progress(folder)) if name == run.name else None))
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["train", "--stage", "rpn"]) == 1
    err = capsys.readouterr().err
    assert f"{state}: the checkpoint to resume from (delete {run} to start afresh) is not " \
        "readable, truncated or corrupt" in err, err
    assert "Traceback" not in err
