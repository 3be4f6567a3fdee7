"""pipeline.prepared: the prepared-set contract (classes.json, the tables) and its readers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import DataError, MissingInputError
from pipeline.prepared_table import (CLASSES_FILE, MODEL_COLUMNS, SCHEMA, load_split, open_table,
                                     read_classes, read_image_bytes, row_resize_info, split_path)
from pipeline.annotations import read_annotations
from tests.support.factories import write_prepared


def test_read_classes(prepared):
    info = read_classes(prepared)
    assert info["classes"] == ["class1", "class2"] and info["image_size"] == 64
    assert info["background"] == 0 and info["ids"] == {"class1": 1, "class2": 2}
    assert read_classes(prepared, image_size=64) == info


def test_read_classes_names_what_is_wrong(prepared, tmp_path):
    with pytest.raises(MissingInputError, match="run `frcnn prepare` first") as caught:
        read_classes(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / CLASSES_FILE) in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)  # what callers catching it expect
    path = prepared / CLASSES_FILE
    for text, fragment in [('{"classes": ["a"', "not valid JSON"),
                           ('["a", "b"]', "expected a non-empty 'classes' list, got ['a', 'b']"),
                           ('{"classes": [], "image_size": 64}', "non-empty 'classes' list"),
                           ('{"classes": ["a"]}', "expected an integer 'image_size', got None"),
                           ('{"classes": ["a"], "image_size": "64"}', "got '64'")]:
        path.write_text(text)
        with pytest.raises(DataError) as caught:
            read_classes(prepared)
        assert str(caught.value).startswith(f"{path}: ") and fragment in str(caught.value), text


def test_read_classes_checks_the_image_size(prepared):
    with pytest.raises(DataError, match=r"prepared at image_size 64 but data.image_size is 640; "
                                        r"run `frcnn prepare`"):
        read_classes(prepared, image_size=640)


def test_tables_follow_the_schema(prepared):
    for split in ("train", "val", "test"):
        assert pq.read_schema(split_path(prepared, split)).equals(SCHEMA, check_metadata=False)
    frame = load_split(prepared, "train", columns=["image_id"])
    assert list(frame.columns) == ["image_id"] and len(frame) == 6


def test_open_table_names_a_missing_table_or_column(prepared, tmp_path):
    assert open_table(split_path(prepared, "train")).num_rows == 6
    with pytest.raises(MissingInputError, match="prepared table not found; run `frcnn prepare`"):
        open_table(tmp_path / "nowhere.parquet")
    table = pq.read_table(split_path(prepared, "train")).drop_columns(["labels", "difficult"])
    pq.write_table(table, tmp_path / "old.parquet")
    with pytest.raises(DataError, match=r"old.parquet: missing column\(s\) labels, difficult; "
                                        r"expected " + ", ".join(MODEL_COLUMNS)):
        open_table(tmp_path / "old.parquet")
    assert open_table(tmp_path / "old.parquet", columns=["image_id", "boxes"]) is not None


def test_read_image_bytes_reads_only_the_row_groups_it_needs(tmp_path, monkeypatch):
    folder = write_prepared(tmp_path / "p", splits={"test": 10}, size=32)
    path = split_path(folder, "test")
    rows = pq.read_table(path).to_pylist()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=4)
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
    assert read_image_bytes(path, [9, 0, 8]) == [rows[i]["image"] for i in (9, 0, 8)]
    assert sorted(reads) == [0, 2]          # groups of rows 0-3 and 8-9; never 4-7
    with pytest.raises(IndexError, match="no row 10"):
        read_image_bytes(path, [10])


def test_row_resize_info_maps_back_to_the_original(prepared):
    row = load_split(prepared, "train").iloc[0]
    info = row_resize_info(row, 64)
    assert (info.orig_width, info.orig_height, info.size) == (64, 64, 64)
    assert (info.scale_x, info.scale_y, info.pad_x, info.pad_y) == (1.0, 1.0, 0.0, 0.0)


def test_classes_json_is_written_with_its_conventions(tmp_path):
    from pipeline.prepared_table import write_classes

    path = write_classes(tmp_path, classes=["a", "b"], image_size=32, resize="letterbox",
                         image_format="jpeg", source="voc:s3://KEY:SECRET@bucket/voc",
                         split="random", images={"train": 3}, rejected_problems=1,
                         digests={"train": "ab" * 32})
    info = json.loads(path.read_text())
    assert info["ids"] == {"a": 1, "b": 2} and info["num_classes"] == 2
    assert info["source"] == "voc:s3://***@bucket/voc"  # credentials masked
    assert read_classes(tmp_path, image_size=32)["resize"] == "letterbox"


def _parts(tmp_path, rows, rows_per_file: int, rows_per_group: int):
    from pipeline.prepare.writer import SplitWriter

    path = tmp_path / f"parts{rows_per_file}-{len(rows)}" / "train.parquet"
    path.parent.mkdir()
    writer = SplitWriter(path, rows_per_file=rows_per_file, rows_per_group=rows_per_group)
    for row in rows:
        writer.add(row)
    writer.close()
    return path


def test_a_split_larger_than_a_file_is_a_folder_of_parts_read_as_one_table(tmp_path):
    """7 rows, groups of 2, files of 4: a folder of two parts (4 + 3 rows); every reader sees
    the same table as the single file of the same rows; the digest is of the content."""
    from pipeline.digests import file_digest
    from pipeline.prepared_table import PreparedTable, table_digest, table_files
    from pipeline.training.loader import DetectionDataset

    folder = write_prepared(tmp_path / "p", splits={"train": 7}, size=32, content="noise")
    rows = pq.read_table(split_path(folder, "train")).to_pylist()
    single = _parts(tmp_path, rows, rows_per_file=100, rows_per_group=2)
    parted = _parts(tmp_path, rows, rows_per_file=4, rows_per_group=2)
    assert single.is_file() and parted.is_dir()
    assert [f.name for f in table_files(parted)] == ["part-00000.parquet", "part-00001.parquet"]
    assert [pq.read_metadata(f).num_rows for f in table_files(parted)] == [4, 3]
    assert not list(tmp_path.rglob(".*.parts"))                  # no leftovers
    a, b = PreparedTable(single), PreparedTable(parted)
    assert a.num_rows == b.num_rows == 7 and a.num_row_groups == b.num_row_groups == 4
    assert [b.row_group_rows(g) for g in range(4)] == [2, 2, 2, 1]
    assert b.read_row_group(2, ["image_id"]).column(0).to_pylist() == ["train_004",
                                                                       "train_005"]
    assert a.read().equals(b.read()) and pq.read_table(parted).num_rows == 7
    assert read_image_bytes(parted, [6, 0, 4]) == [rows[i]["image"] for i in (6, 0, 4)]
    for i in range(7):
        assert torch.equal(DetectionDataset(parted)[i][0], DetectionDataset(single)[i][0])
    assert read_annotations(parted).boxes.tolist() == read_annotations(single).boxes.tolist()
    assert table_digest(single) == file_digest(single)
    assert table_digest(parted) != table_digest(_parts(tmp_path, rows[:6], 4, 2))
    with pytest.raises(MissingInputError, match="prepared table not found"):
        PreparedTable(tmp_path / "nothing.parquet")
