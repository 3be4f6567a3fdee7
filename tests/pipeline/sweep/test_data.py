"""pipeline.sweep.data: the trials' tables (first images, resized with their boxes) and the key
of a sweep's inputs."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.sweep.data import inputs_key, trial_tables
from tests.support.factories import write_prepared


def test_trial_tables_take_the_first_images_resized_with_their_boxes(project, sweep_cfg):
    tables = trial_tables(sweep_cfg())
    train = pq.read_table(io.BytesIO(tables["train"])).to_pylist()
    source = pq.read_table(project / "data" / "prepared" / "train.parquet").to_pylist()
    assert [r["image_id"] for r in train] == [r["image_id"] for r in source[:4]]
    for small, big in zip(train, source):
        assert Image.open(io.BytesIO(small["image"])).size == (64, 64)
        assert np.allclose(np.asarray(small["boxes"]), np.asarray(big["boxes"]) / 2)
        assert small["labels"] == big["labels"]
    val = pq.read_table(io.BytesIO(tables["eval"])).column("image_id").to_pylist()
    assert val == ["val_000", "val_001"]  # the whole sweep.split
    # at the prepared size the bytes of the images are kept
    same = trial_tables(sweep_cfg(**{"sweep.image_size": 0, "sweep.max_train_images": 0}))
    assert pq.read_table(io.BytesIO(same["train"])).column("image").to_pylist() == \
        [r["image"] for r in source]


def test_trial_tables_read_a_row_group_at_a_time(project, sweep_cfg, monkeypatch):
    """The driver never reads a split's image column whole: only row groups, and no more of
    train's than ``sweep.max_train_images`` needs."""
    from pipeline.prepared_table import SCHEMA

    path = project / "data" / "prepared" / "train.parquet"
    pq.write_table(pq.read_table(path).cast(SCHEMA), path, row_group_size=2)  # 6 rows: 3 groups
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: reads.append(i) or original(self, i, **kw))

    def whole(*args, **kwargs):
        raise AssertionError("a whole table read")

    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    tables = trial_tables(sweep_cfg())   # sweep.max_train_images 4: two of train's groups
    assert reads == [0, 1, 0]   # train's first two groups, then val's one
    monkeypatch.undo()
    assert pq.read_table(io.BytesIO(tables["train"])).num_rows == 4


def test_trial_tables_refuse_data_prepared_at_another_size(project, sweep_cfg):
    with pytest.raises(ValueError, match="prepared at image_size 128"):
        trial_tables(sweep_cfg(**{"data.image_size": 256}))


def test_trial_tables_refuse_an_empty_split(project, sweep_cfg):
    write_prepared(project / "data" / "prepared", size=128, num_images=6, num_eval=0)
    with pytest.raises(ValueError, match="val.parquet: no images: a sweep needs val images"):
        trial_tables(sweep_cfg())


def test_inputs_key_follows_parameters_and_data_not_locations(project, sweep_cfg):
    cfg = sweep_cfg()
    tables = trial_tables(cfg)
    key = inputs_key(cfg, tables)
    moved = cfg.replace({"tracking.uri": "sqlite:////elsewhere.db", "sweep.storage_path": "/x",
                         "sweep.table_path": "t.parquet", "train.ray_address": "auto"})
    assert inputs_key(moved, tables) == key
    assert inputs_key(cfg.replace({"sweep.epochs": 3}), tables) != key
    assert inputs_key(cfg, {**tables, "eval": tables["train"]}) != key
