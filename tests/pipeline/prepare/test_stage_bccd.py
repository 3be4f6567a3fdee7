"""pipeline.prepare.stage (``frcnn prepare``) on the real BCCD dataset (examples/bccd, bundled,
PASCAL VOC layout).

Counts, classes and box scaling are checked against the XML files, read here independently.
The ``bccd_dir`` fixture gives the bundled folder.
BCCD: 364 images of 640x480, classes RBC / WBC / Platelets; ``BloodImage_00338.xml`` and
``BloodImage_00343.xml`` each hold one zero-area box.
"""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.prepared_table import load_split
from tests.support import ROOT

PARAMS = str(ROOT / "params.yaml")
BROKEN = {"BloodImage_00338": 12, "BloodImage_00343": 3}   # image -> index of its zero-area box
SPLITS = ("train", "val", "test")


def xml_objects(bccd: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """``{image_id: [(class name, [xmin, ymin, xmax, ymax]), ...]}`` straight from the XML."""
    out = {}
    for path in sorted((bccd / "Annotations").glob("*.xml")):
        root = ET.parse(path).getroot()
        out[path.stem] = [(obj.findtext("name").strip(),
                           [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")])
                          for obj in root.iter("object")]
    return out


@pytest.fixture(scope="module")
def prepared(bccd_dir, tmp_path_factory) -> Path:
    """BCCD prepared at 640x640 (stretch) with on_invalid=skip, on both cores."""
    out = tmp_path_factory.mktemp("bccd") / "prepared"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out.parent / 'mlflow.db'}")
        code = main(["prepare", "--params", PARAMS, "--set", f"data.source=voc:{bccd_dir}",
                     "--set", "data.on_invalid=skip", "--set", f"data.out_dir={out}",
                     "--set", "data.num_workers=2"])
    assert code == 0
    return out


def test_default_refuses_the_two_zero_area_boxes_by_name(bccd_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "prepared"
    code = main(["prepare", "--params", PARAMS, "--set", f"data.source=voc:{bccd_dir}",
                 "--set", f"data.out_dir={out}"])
    assert code == 1
    err = capsys.readouterr().err
    for image_id, index in BROKEN.items():
        assert f"{bccd_dir / 'Annotations' / image_id}.xml: object {index}: zero-area box" in err
    assert not out.exists()


def test_skip_lists_them_in_rejected_csv(prepared, bccd_dir, capsys):
    with (prepared / "rejected.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["image_id"], int(r["box_index"])) for r in rows} == set(BROKEN.items())
    for r in rows:
        assert r["source"] == str(bccd_dir / "Annotations" / f"{r['image_id']}.xml")
        assert r["reason"].startswith("zero-area box")


def test_counts_and_classes_match_the_xml(prepared, bccd_dir):
    objects = xml_objects(bccd_dir)
    kept = {image_id: objs for image_id, objs in objects.items() if image_id not in BROKEN}
    assert len(objects) == 364 and len(kept) == 362
    info = json.loads((prepared / "classes.json").read_text())
    assert info["classes"] == ["Platelets", "RBC", "WBC"] and info["background"] == 0
    assert info["image_size"] == 640
    frames = {split: load_split(prepared, split) for split in SPLITS}
    assert {s: len(f) for s, f in frames.items()} == info["images"]
    assert sum(info["images"].values()) == 362 and min(info["images"].values()) > 40
    ids = [i for f in frames.values() for i in f.image_id]
    assert sorted(ids) == sorted(kept)
    labels = Counter(info["classes"][label - 1] for f in frames.values()
                     for row in f.labels for label in row)
    assert labels == Counter(name for objs in kept.values() for name, _ in objs)
    # Every box of the two rejected images is gone, not just the zero-area ones.
    assert sum(labels.values()) == 4888 - sum(len(objects[image_id]) for image_id in BROKEN)


def test_boxes_are_the_xml_boxes_stretched_to_640(prepared, bccd_dir):
    objects = xml_objects(bccd_dir)
    classes = json.loads((prepared / "classes.json").read_text())["classes"]
    for split in SPLITS:
        for row in load_split(prepared, split).itertuples():
            names, boxes = zip(*objects[row.image_id])
            expected = np.array(boxes) * [1.0, 4 / 3, 1.0, 4 / 3]     # 640x480 -> 640x640
            np.testing.assert_allclose(np.stack(row.boxes), expected, rtol=1e-6, atol=1e-4)
            assert [classes[i - 1] for i in row.labels] == list(names)
            assert not any(row.difficult)
            assert (row.orig_width, row.orig_height) == (640, 480)
            assert (row.scale_x, row.scale_y) == (1.0, 4 / 3)
            assert row.source == str(bccd_dir / "JPEGImages" / f"{row.image_id}.jpg")
    image = Image.open(io.BytesIO(row.image))
    assert image.size == (640, 640) and image.format == "PNG"


def test_imagesets_split_follows_the_dataset(bccd_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "prepared"
    code = main(["prepare", "--params", PARAMS, "--set", f"data.source=voc:{bccd_dir}",
                 "--set", "data.on_invalid=skip", "--set", "data.split=imagesets",
                 "--set", "data.image_size=32", "--set", f"data.out_dir={out}"])
    assert code == 0
    listed = {split: set((bccd_dir / "ImageSets" / "Main" / f"{split}.txt").read_text().split())
              for split in SPLITS}
    assert {s: len(v) for s, v in listed.items()} == {"train": 205, "val": 87, "test": 72}
    for split in SPLITS:
        assert set(load_split(out, split, columns=["image_id"]).image_id) == listed[split] - set(BROKEN)
    assert "classes (3): Platelets, RBC, WBC" in capsys.readouterr().out
