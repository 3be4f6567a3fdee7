"""pipeline.prepare.stage (``frcnn prepare``) end to end on small generated datasets: tables,
splits, bad input, atomicity."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import Config, from_dict
from pipeline.errors import DataError
from pipeline.images import PAD_COLOUR, unscale_boxes
from pipeline.prepare import run
from pipeline.prepare.splits import assign_splits
from pipeline.prepare.stage import prepare_dataset
from pipeline.prepare.synthetic import boxes_and_labels, layout
from pipeline.prepared_table import SCHEMA, SPLITS, load_split, row_resize_info, split_path
from tests.support import ROOT, mlflow_store
from tests.support.datasets import voc_xml, write_coco, write_voc


def make_cfg(out: Path, **data) -> Config:
    base = {"out_dir": str(out), "num_workers": 1, "image_size": 64}
    return from_dict({"data": base | data})


def read_rejected(out: Path) -> list[dict[str, str]]:
    with (out / "rejected.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a failed run might have left beside the output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# Synthetic: the tables as built


def test_synthetic_tables_schema_and_contents(tmp_path):
    out = tmp_path / "prepared"
    result = prepare_dataset(make_cfg(out, synthetic_images=12, seed=3), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "test.parquet",
                                                     "train.parquet", "val.parquet"]
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    assert out.stat().st_mode == sibling.stat().st_mode   # not the 0700 of a temporary folder
    assert result.images == {"train": 8, "val": 2, "test": 2}
    info = json.loads((out / "classes.json").read_text())
    assert info["classes"] == ["rectangle", "ellipse", "triangle", "diamond"]
    assert info["background"] == 0 and info["ids"]["rectangle"] == 1 and info["num_classes"] == 4
    assert info["image_size"] == 64 and info["resize"] == "stretch" and info["images"] == result.images

    seen = []
    for split in SPLITS:
        assert pq.read_schema(out / f"{split}.parquet").equals(SCHEMA, check_metadata=False)
        frame = load_split(out, split)
        assert list(frame.image_id) == sorted(frame.image_id)
        seen += list(frame.image_id)
        for row in frame.itertuples():
            index = int(row.source.rsplit(":", 1)[1])
            assert row.source == f"synthetic:3:{index}" and row.image_id == f"synthetic_{index:06d}"
            assert (row.orig_width, row.orig_height) == (640, 640)
            image = Image.open(io.BytesIO(row.image))
            assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
            boxes, labels = boxes_and_labels(layout(3, index, 4))
            np.testing.assert_allclose(np.stack(row.boxes), boxes * 0.1, rtol=1e-6)
            assert list(row.labels) == labels.tolist() and not any(row.difficult)
            assert (row.scale_x, row.scale_y, row.pad_x, row.pad_y) == (0.1, 0.1, 0.0, 0.0)
    assert sorted(seen) == [f"synthetic_{i:06d}" for i in range(12)]
    assert result.boxes["train"] + result.boxes["val"] + result.boxes["test"] == sum(
        len(layout(3, i, 4)) for i in range(12))
    assert "prepared 12 images (train 8, val 2, test 2)" in result.summary()
    assert result.metrics()["images_train"] == 8.0


def test_tables_do_not_depend_on_the_number_of_workers(tmp_path):
    one = prepare_dataset(make_cfg(tmp_path / "one", synthetic_images=6), progress=False)
    two = prepare_dataset(make_cfg(tmp_path / "two", synthetic_images=6, num_workers=2),
                          progress=False)
    assert one.images == two.images
    for split in SPLITS:
        a = pq.read_table(tmp_path / "one" / f"{split}.parquet")
        b = pq.read_table(tmp_path / "two" / f"{split}.parquet")
        assert a.equals(b)


def test_a_set_prepared_into_a_bucket_reads_as_the_same_set_prepared_locally(tmp_path, bucket):
    """``data.out_dir`` a bucket URI: the same tables as a local folder (every reader over the
    URI), ``classes.json`` recording each table's digest; preparing again replaces the set."""
    from pipeline.prepared_table import open_table, read_classes, read_image_bytes, table_digest
    from pipeline.annotations import read_annotations

    uri = "mem://b/prepared"
    local = prepare_dataset(make_cfg(tmp_path / "local", synthetic_images=12), progress=False)
    remote = prepare_dataset(make_cfg(uri, synthetic_images=12), progress=False)
    assert remote.out_dir == uri and remote.images == local.images
    assert read_classes(uri) == read_classes(local.out_dir)
    for split in SPLITS:
        here, there = split_path(local.out_dir, split), split_path(uri, split)
        assert there == f"{uri}/{split}.parquet"
        assert table_digest(there) == table_digest(here) == read_classes(uri)["digests"][split]
        assert open_table(there).read().equals(open_table(here).read())
        assert read_annotations(there).boxes.tolist() == read_annotations(here).boxes.tolist()
    assert read_image_bytes(split_path(uri, "train"), [1]) == \
        read_image_bytes(split_path(local.out_dir, "train"), [1])
    prepare_dataset(make_cfg(uri, synthetic_images=6), progress=False)
    assert sum(read_classes(uri)["images"].values()) == 6
    assert open_table(split_path(uri, "train")).num_rows == read_classes(uri)["images"]["train"]
    assert sorted(i.base_name for i in bucket.get_file_info(
        pyarrow.fs.FileSelector("b/prepared"))) == ["classes.json", "test.parquet",
                                                    "train.parquet", "val.parquet"]


def test_jpeg_format_and_letterbox(tmp_path):
    root = write_voc(tmp_path / "voc", {"a": [("cat", (4, 6, 40, 30), True)]}, size=(64, 48))
    out = tmp_path / "prepared"
    prepare_dataset(make_cfg(out, source=f"voc:{root}", image_size=32, resize="letterbox",
                             image_format="jpeg", val_fraction=0.0, test_fraction=0.0),
                    progress=False)
    row = load_split(out, "train").iloc[0]
    image = Image.open(io.BytesIO(row.image))
    assert image.format == "JPEG" and image.size == (32, 32)
    # 64x48 -> 32x24 pasted at y = 4: x' = x / 2, y' = y / 2 + 4.
    assert (row.scale_x, row.scale_y, row.pad_x, row.pad_y) == (0.5, 0.5, 0.0, 4.0)
    np.testing.assert_allclose(np.stack(row.boxes), [[2, 7, 20, 19]])
    back = unscale_boxes(np.stack(row.boxes), row_resize_info(row, 32))
    np.testing.assert_allclose(back, [[4, 6, 40, 30]])                  # the XML box again
    assert list(row.difficult) == [True]
    assert np.abs(np.subtract(image.convert("RGB").getpixel((16, 0)), PAD_COLOUR)).max() <= 3


# --------------------------------------------------------------------------------------------
# Splits (assignment itself: test_splits.py)


def test_imagesets_split_is_kept(tmp_path):
    images = {f"im{i}": [("cat", (1, 1, 9, 9), False)] for i in range(5)}
    root = write_voc(tmp_path / "voc", images,
                     imagesets={"train": ["im0", "im1", "im2"], "val": ["im4"]})
    out = tmp_path / "prepared"
    result = prepare_dataset(make_cfg(out, source=f"voc:{root}", split="imagesets"), progress=False)
    assert result.images == {"train": 3, "val": 1, "test": 0}   # im3 is listed nowhere
    assert list(load_split(out, "val").image_id) == ["im4"]
    assert load_split(out, "test").empty


def test_coco_end_to_end(tmp_path):
    path = write_coco(tmp_path / "coco")
    out = tmp_path / "prepared"
    result = prepare_dataset(make_cfg(out, source=f"coco:{path}", image_size=40,
                                      val_fraction=0.0, test_fraction=0.0), progress=False)
    assert result.classes == ("apple", "zebra") and result.images["train"] == 3
    row = load_split(out, "train").set_index("image_id").loc["1"]
    # 80x40 -> 40x40: x / 2, y unchanged.
    np.testing.assert_allclose(np.stack(row.boxes), [[5, 5, 15, 15], [0.25, 1.5, 15.25, 21.5]])
    assert list(row.labels) == [2, 1] and list(row.difficult) == [False, False]
    assert list(row.crowd) == [False, True]                             # iscrowd: 1
    assert row.source == str(tmp_path / "coco" / "images" / "one.png")


# --------------------------------------------------------------------------------------------
# Bad input: each case refused by default, dropped and listed with on_invalid=skip


def _truncate(path: Path) -> None:
    Image.effect_noise((64, 48), 60).convert("RGB").save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _xml(root: Path, text: str) -> None:
    (root / "Annotations" / "bad.xml").write_text(text)


BAD_CASES = {
    # name: (how to break image "bad", file named in the message, fragment of the reason)
    "missing image": (lambda r: (r / "JPEGImages" / "bad.jpg").unlink(), "bad.jpg", "image file not found"),
    "truncated image": (lambda r: _truncate(r / "JPEGImages" / "bad.jpg"), "bad.jpg", "truncated"),
    "unreadable image": (lambda r: (r / "JPEGImages" / "bad.jpg").write_bytes(b"GIF89a garbage"),
                         "bad.jpg", "unreadable image"),
    "malformed xml": (lambda r: _xml(r, "<annotation><object>"), "bad.xml", "malformed XML"),
    "zero-area box": (lambda r: _xml(r, voc_xml("bad.jpg", (64, 48), [("cat", (9, 9, 9, 20), False)])),
                      "bad.xml", "zero-area box [9, 9, 9, 20]"),
    "inverted box": (lambda r: _xml(r, voc_xml("bad.jpg", (64, 48), [("cat", (9, 30, 20, 10), False)])),
                     "bad.xml", "zero-area box"),
    "box outside": (lambda r: _xml(r, voc_xml("bad.jpg", (64, 48), [("cat", (70, 5, 90, 20), False)])),
                    "bad.jpg", "lies entirely outside the 64x48 image"),
    "unknown class": (lambda r: _xml(r, voc_xml("bad.jpg", (64, 48), [("zebra", (1, 1, 9, 9), False)])),
                      "bad.xml", "unknown class 'zebra'"),
    "size mismatch": (lambda r: _xml(r, voc_xml("bad.jpg", (100, 100), [("cat", (1, 1, 9, 9), False)])),
                      "bad.jpg", "gives the image size 100x100, the file is 64x48"),
    "path escape": (lambda r: _xml(r, voc_xml("../../outside.jpg", (64, 48), [])), "bad.xml",
                    "leads outside the dataset folder"),
}


def _bad_voc(tmp_path: Path, case: str) -> Path:
    images = {f"good{i}": [("cat", (1, 1, 30, 30), False), ("dog", (20, 10, 60, 40), False)]
              for i in range(4)}
    images["bad"] = [("cat", (5, 5, 25, 25), False)]
    root = write_voc(tmp_path / "voc", images)
    Image.new("RGB", (64, 48)).save(tmp_path / "outside.jpg")
    BAD_CASES[case][0](root)
    return root


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_stops_by_default_naming_the_file(tmp_path, case):
    root = _bad_voc(tmp_path, case)
    out = tmp_path / "out" / "prepared"
    out.parent.mkdir()
    cfg = make_cfg(out, source=f"voc:{root}", classes=["cat", "dog"], val_fraction=0.0,
                   test_fraction=0.0, num_workers=2 if case == "truncated image" else 1)
    with pytest.raises(DataError) as info:
        prepare_dataset(cfg, progress=False)
    _, file_name, fragment = BAD_CASES[case]
    message = str(info.value)
    assert message.startswith(str(root)) and file_name in message.split(":")[0]
    assert fragment in message and "data.on_invalid=skip" in message
    assert not out.exists() and leftovers(out.parent) == []   # nothing partial left behind


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_skipped_and_listed(tmp_path, case):
    root = _bad_voc(tmp_path, case)
    out = tmp_path / "prepared"
    cfg = make_cfg(out, source=f"voc:{root}", classes=["cat", "dog"], on_invalid="skip",
                   val_fraction=0.0, test_fraction=0.0)
    result = prepare_dataset(cfg, progress=False)
    assert result.images["train"] == 4 and result.rejected_images == 1
    assert list(load_split(out, "train").image_id) == [f"good{i}" for i in range(4)]
    (rejected,) = read_rejected(out)
    _, file_name, fragment = BAD_CASES[case]
    assert rejected["image_id"] == "bad" and Path(rejected["source"]).name == file_name
    assert fragment in rejected["reason"]
    assert json.loads((out / "classes.json").read_text())["rejected_problems"] == 1


def test_boxes_crossing_the_border_are_clipped(tmp_path):
    root = write_voc(tmp_path / "voc", {"a": [("cat", (-5, -3, 70, 30), False),
                                              ("cat", (10, 40, 20, 60), False)]}, size=(64, 48))
    out = tmp_path / "prepared"
    prepare_dataset(make_cfg(out, source=f"voc:{root}", val_fraction=0.0, test_fraction=0.0),
                    progress=False)
    row = load_split(out, "train").iloc[0]
    # Clipped to [0, 64] x [0, 48], then y * 64 / 48.
    np.testing.assert_allclose(np.stack(row.boxes), [[0, 0, 64, 40], [10, 160 / 3, 20, 64]],
                               rtol=1e-6)


def test_empty_dataset_is_an_error_in_both_modes(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match="empty"):
            prepare_dataset(make_cfg(tmp_path / "p", source=f"voc:{root}", on_invalid=mode),
                            progress=False)
    root = write_voc(tmp_path / "voc2", {"a": [("cat", (5, 5, 5, 9), False)]})
    with pytest.raises(DataError, match="no valid image left"):
        prepare_dataset(make_cfg(tmp_path / "p", source=f"voc:{root}", on_invalid="skip",
                                 val_fraction=0.0, test_fraction=0.0), progress=False)
    assert not (tmp_path / "p").exists()


def test_a_split_emptied_by_rejection_is_an_error(tmp_path):
    images = {f"im{i}": [("cat", (1, 1, 9, 9), False)] for i in range(4)}
    root = write_voc(tmp_path / "voc", images)
    splits = assign_splits(list(images), val_fraction=0.25, test_fraction=0.0, seed=0)
    (val_id,) = [i for i, s in splits.items() if s == "val"]
    (root / "JPEGImages" / f"{val_id}.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match="the val split is empty"):
        prepare_dataset(make_cfg(tmp_path / "p", source=f"voc:{root}", on_invalid="skip",
                                 val_fraction=0.25, test_fraction=0.0), progress=False)


def test_failed_run_keeps_the_previous_output(tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(make_cfg(out, synthetic_images=4, val_fraction=0.0, test_fraction=0.0),
                    progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    root = write_voc(tmp_path / "voc", {"a": [("cat", (5, 5, 5, 9), False)], "b": []})
    (root / "JPEGImages" / "b.jpg").write_bytes(b"broken")
    for mode in ("error", "skip"):
        with pytest.raises(DataError):
            prepare_dataset(make_cfg(out, source=f"voc:{root}", on_invalid=mode), progress=False)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert leftovers(tmp_path) == []


def test_run_reports_to_the_console_and_mlflow(tmp_path, capsys, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert run(make_cfg(tmp_path / "ok", synthetic_images=3, val_fraction=0.0, test_fraction=0.0)) == 0
    captured = capsys.readouterr()
    assert "prepared 3 images (train 3, val 0, test 0)" in captured.out and "images/s" in captured.out
    (logged,) = mlflow_store.runs(db)
    assert logged.info.run_name == "prepare" and logged.info.status == "FINISHED"
    assert logged.data.metrics["images_train"] == 3.0 and logged.data.metrics["images_per_second"] > 0
    assert logged.data.tags["classes"] == "rectangle,ellipse,triangle,diamond"
    assert set(mlflow_store.artifacts(db, logged.info.run_id, "prepared")) == {
        "prepared/classes.json"}  # no rejected.csv with on_invalid: error
    # a failure: raised for the command line to report, the run FAILED with it, nothing printed
    root = write_voc(tmp_path / "voc", {"a": [("cat", (5, 5, 5, 9), False)]})
    with pytest.raises(DataError) as caught:
        run(make_cfg(tmp_path / "bad", source=f"voc:{root}"))
    assert str(caught.value).startswith(f"{root / 'Annotations' / 'a.xml'}: object 0: zero-area box")
    assert capsys.readouterr().out == ""
    failed = [r for r in mlflow_store.runs(db) if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["error"].startswith("DataError: ")


def test_the_command_line_reports_a_failure_on_one_line(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = write_voc(tmp_path / "voc", {"a": [("cat", (5, 5, 5, 9), False)]})
    assert main(["prepare", "--params", str(ROOT / "params.yaml"), "--set", f"data.source=voc:{root}",
                 "--set", f"data.out_dir={tmp_path / 'bad'}"]) == 1
    err = capsys.readouterr().err
    assert f"frcnn prepare: {root / 'Annotations' / 'a.xml'}: object 0: zero-area box" in err
    assert "Traceback" not in err
