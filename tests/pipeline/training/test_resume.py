"""pipeline.training.resume: the run key, the checkpoint Ray Train will restore, the run state."""

from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.digests import file_digest
from pipeline.errors import DataError
from pipeline.training import resume
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


def test_latest_checkpoint_is_none_before_the_first_and_refuses_a_foreign_record(tmp_path):
    """No run folder, or one with no checkpoint recorded: None. A record Ray cannot read is a
    DataError naming the folder to delete. (The latest of a real run:
    ``test_train_rpn_on_two_ray_workers``.)"""
    assert resume.latest_checkpoint(str(tmp_path), "train_rpn-abc") is None
    resume.write_run_state(str(tmp_path), "train_rpn-abc", "0123abcd")
    assert resume.latest_checkpoint(str(tmp_path), "train_rpn-abc") is None
    (tmp_path / "train_rpn-abc" / "checkpoint_manager_snapshot.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="record of its checkpoints is unreadable.*delete "
                                        ".*train_rpn-abc"):
        resume.latest_checkpoint(str(tmp_path), "train_rpn-abc")


def test_run_state_round_trip(tmp_path):
    root = str(tmp_path)
    assert resume.read_run_state(root, "train_rpn-abc") == {}
    resume.write_run_state(root, "train_rpn-abc", "0123abcd")
    assert resume.read_run_state(root, "train_rpn-abc") == {"mlflow_run_id": "0123abcd"}
    assert (tmp_path / "train_rpn-abc" / resume.RUN_STATE).is_file()
