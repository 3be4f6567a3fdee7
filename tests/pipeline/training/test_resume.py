"""pipeline.training.resume: the run key, the checkpoint Ray Train will restore, the run state."""

from __future__ import annotations

import json

import pytest

from pipeline.config import Config
from pipeline.digests import file_digest
from pipeline.training import checkpoints, resume
from tests.support.factories import RAY_PARAMS, write_prepared


def test_run_key_follows_training_inputs_only(tmp_path):
    data = file_digest(write_prepared(tmp_path / "data" / "prepared", size=64,
                                      num_images=6) / "train.parquet")
    cfg = Config().replace(RAY_PARAMS)
    key = resume.run_key(cfg, "rpn", data, None)
    assert key == resume.run_key(cfg.replace({"eval.batch_size": 9, "train.log_every": 5,
                                              "train.use_gpu": "auto",
                                              "train.checkpoint_every": 3}), "rpn", data, None)
    assert key != resume.run_key(cfg.replace({"train.lr": 0.02}), "rpn", data, None)
    assert key != resume.run_key(cfg.replace({"rpn.pos_iou": 0.6}), "rpn", data, None)
    assert key != resume.run_key(cfg, "frcnn", data, None)
    other = file_digest(write_prepared(tmp_path / "other", size=64, num_images=6,
                                       seed=1) / "train.parquet")
    assert key != resume.run_key(cfg, "rpn", other, None)
    assert key != resume.run_key(cfg, "rpn", data, other)  # another model to start from


def test_latest_checkpoint_reads_rays_snapshot(tmp_path):
    run = tmp_path / "train_rpn-abc"
    assert resume.latest_checkpoint(str(tmp_path), "train_rpn-abc") is None
    (run / "checkpoint_e000_s0000002").mkdir(parents=True)
    (run / "checkpoint_e000_s0000002" / checkpoints.PROGRESS).write_text(
        json.dumps({"epoch": 0, "step": 2}))
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_e000_s0000002"}}))
    path, progress = resume.latest_checkpoint(str(tmp_path), "train_rpn-abc")
    assert path == str(run / "checkpoint_e000_s0000002") and progress["step"] == 2


def test_latest_checkpoint_refuses_a_snapshot_that_is_not_an_object(tmp_path):
    (tmp_path / "train_rpn-abc").mkdir()
    (tmp_path / "train_rpn-abc" / "checkpoint_manager_snapshot.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        resume.latest_checkpoint(str(tmp_path), "train_rpn-abc")


def test_run_state_round_trip(tmp_path):
    root = str(tmp_path)
    assert resume.read_run_state(root, "train_rpn-abc") == {}
    resume.write_run_state(root, "train_rpn-abc", "0123abcd")
    assert resume.read_run_state(root, "train_rpn-abc") == {"mlflow_run_id": "0123abcd"}
    assert (tmp_path / "train_rpn-abc" / resume.RUN_STATE).is_file()
