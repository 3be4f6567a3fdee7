"""pipeline.annotations: a prepared table's boxes, labels and flags, read without its images."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import DataError
from pipeline.prepared_table import SCHEMA, split_path
from pipeline.annotations import read_annotations, read_ground_truth
from tests.support.factories import write_prepared


def test_read_ground_truth_image_by_image(tmp_path):
    folder = write_prepared(tmp_path / "p", splits={"test": 6}, content="noise")
    truth = read_ground_truth(split_path(folder, "test"), "test")
    assert truth.name == "test" and len(truth) == 6
    assert truth.image_ids == [f"test_{i:03d}" for i in range(6)]
    rows = pq.read_table(split_path(folder, "test")).to_pylist()
    for i, row in enumerate(rows):
        g = i % 5  # the noise factory: i % 5 boxes, the third one difficult
        assert truth.boxes[i].shape == (g, 4) and truth.boxes[i].dtype == torch.float32
        assert truth.labels[i].tolist() == row["labels"] and truth.labels[i].dtype == torch.int64
        assert truth.difficult[i].tolist() == [j == 2 for j in range(g)]
        assert torch.equal(truth.boxes[i], torch.tensor(row["boxes"]).reshape(-1, 4))


def test_read_ground_truth_refuses_boxes_and_labels_that_disagree(tmp_path):
    folder = write_prepared(tmp_path / "p", splits={"test": 2})
    table = pq.read_table(split_path(folder, "test")).to_pylist()
    table[1]["labels"] = table[1]["labels"] + [1]
    pq.write_table(pa.Table.from_pylist(table, schema=SCHEMA), split_path(folder, "test"))
    n = len(table[1]["boxes"])
    with pytest.raises(DataError, match=f"test.parquet: image 'test_001' has {n} boxes but "
                                        f"{n + 1} labels"):
        read_ground_truth(split_path(folder, "test"), "test")
    table[1]["labels"] = table[1]["labels"][:n]
    table[0]["crowd"] = [True] * (len(table[0]["boxes"]) + 2)
    pq.write_table(pa.Table.from_pylist(table, schema=SCHEMA), split_path(folder, "test"))
    with pytest.raises(DataError, match=f"image 'test_000' has {len(table[0]['boxes'])} boxes "
                                        f"but {len(table[0]['boxes']) + 2} crowd"):
        read_annotations(split_path(folder, "test"))


def test_annotations_are_flat_arrays_and_a_missing_flag_list_means_false(tmp_path):
    """Image i owns rows offsets[i]:offsets[i+1]; a null difficult / crowd list (a table
    written without them) is False for every box; null labels are an error only with boxes."""
    folder = write_prepared(tmp_path / "p", splits={"test": 5}, content="noise")
    rows = pq.read_table(split_path(folder, "test")).to_pylist()
    rows[1]["difficult"] = None
    rows[2]["crowd"] = None
    rows[0]["boxes"], rows[0]["labels"] = None, None   # the noise factory's image 0: no boxes
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), split_path(folder, "test"))
    ann = read_annotations(split_path(folder, "test"))
    counts = [len(r["boxes"] or []) for r in rows]
    assert ann.offsets.tolist() == [0, *np.cumsum(counts).tolist()]
    assert ann.boxes.shape == (sum(counts), 4) and ann.boxes.dtype == np.float32
    assert ann.boxes.flags.writeable and ann.labels.dtype == np.int64
    for i, row in enumerate(rows):
        part = ann.rows(i)
        assert ann.boxes[part].tolist() == (row["boxes"] or [])
        assert ann.labels[part].tolist() == (row["labels"] or [])
        assert ann.difficult[part].tolist() == (row["difficult"] or [False] * counts[i])
        assert ann.crowd[part].tolist() == (row["crowd"] or [False] * counts[i])
        assert ann.image_id(i) == row["image_id"]
