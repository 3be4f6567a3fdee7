"""COCO reader: bbox conversion, iscrowd, categories, image_root, and malformed input.

:func:`tests.support.datasets.write_coco` builds the small COCO files.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from pipeline.prepare.coco import read_coco
from pipeline.prepare.records import DataError
from tests.support.datasets import coco_doc, write_coco


def test_reads_boxes_as_x1y1x2y2_with_iscrowd_flagged(tmp_path):
    reading = read_coco(write_coco(tmp_path))
    assert reading.problems == []
    assert reading.classes == ("apple", "zebra")          # categories in id order: 3, 7
    one, two, three = reading.items
    assert (one.image_id, two.image_id, three.image_id) == ("1", "2", "3")
    np.testing.assert_array_equal(one.boxes, [[10, 5, 30, 15], [0.5, 1.5, 30.5, 21.5]])
    assert one.labels.tolist() == [2, 1] and one.difficult.tolist() == [False, False]
    assert one.crowd.tolist() == [False, True]
    assert two.labels.tolist() == [1] and two.crowd.tolist() == [False]
    assert three.boxes.shape == (0, 4)                    # no annotations: all background
    assert one.path == tmp_path / "images" / "one.png" and one.declared_size == (80, 40)


def test_image_root_and_explicit_classes(tmp_path):
    path = write_coco(tmp_path, images_dir="pictures")
    with pytest.raises(DataError, match="images: image folder not found"):
        read_coco(path)
    reading = read_coco(path, image_root=tmp_path / "pictures", classes=["zebra", "apple"])
    assert reading.classes == ("zebra", "apple")
    assert reading.items[0].labels.tolist() == [1, 2]
    only_apples = read_coco(path, image_root=tmp_path / "pictures", classes=["apple"])
    assert [item.image_id for item in only_apples.items] == ["2", "3"]
    (problem,) = only_apples.problems
    assert problem.image_id == "1" and problem.box_index == 0
    assert "unknown class 'zebra'" in problem.reason and "annotations[0] (id 10)" in problem.reason


def _edit(doc, where, value):
    section, index, key = where
    if key is None:
        doc[section][index] = value
    else:
        doc[section][index][key] = value
    return doc


@pytest.mark.parametrize("where, value, fragment, image_id", [
    (("annotations", 0, "bbox"), [10, 5, 0, 10], "zero-area box [10, 5, 10, 15] (w <= 0 or h <= 0)", "1"),
    (("annotations", 0, "bbox"), [10, 5, 20, -1], "zero-area box", "1"),
    (("annotations", 0, "bbox"), [10, 5, 20], "malformed bbox", "1"),
    (("annotations", 0, "bbox"), "10,5,20,10", "malformed bbox", "1"),
    (("annotations", 0, "category_id"), 99, "unknown class: category_id 99", "1"),
    (("annotations", 0, "iscrowd"), 5, "iscrowd 5", "1"),
    (("images", 1, "file_name"), "../../escape.png", "leads outside the image folder", "2"),
    (("images", 1, "file_name"), "/etc/passwd", "leads outside the image folder", "2"),
    (("images", 1, "file_name"), "absent.png", "image file not found", "2"),
    (("images", 1, "width"), 0, "width 0 is not a positive integer", "2"),
    (("images", 1, "height"), None, "height None", "2"),
    (("annotations", 2, "image_id"), 42, "image_id 42 is not in 'images'", ""),
    (("annotations", 2, None), ["x"], "malformed annotation", ""),
    (("images", 1, None), "x", "malformed image entry", ""),
])
def test_bad_entry_is_a_problem(tmp_path, where, value, fragment, image_id):
    path = write_coco(tmp_path)
    doc = _edit(json.loads(path.read_text()), where, value)
    path.write_text(json.dumps(doc))
    reading = read_coco(path)
    matching = [p for p in reading.problems if fragment in p.reason]
    assert matching, reading.problems
    assert matching[0].image_id == image_id
    assert image_id not in {item.image_id for item in reading.items}


@pytest.mark.parametrize("text, fragment", [
    ('{"images": [', "malformed JSON"),
    ("[1, 2]", "expected an object"),
    ('{"images": [], "annotations": [], "categories": []}', "no images"),
    ('{"images": [{"id": 1}], "categories": []}', "'annotations' must be a list"),
])
def test_unreadable_file_raises(tmp_path, text, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=fragment) as info:
        read_coco(path)
    assert str(info.value).startswith(str(path))


def test_inconsistent_categories_and_duplicate_ids_raise(tmp_path):
    doc = coco_doc()
    doc["categories"].append({"id": 7, "name": "other"})
    with pytest.raises(DataError, match="duplicate category id 7"):
        read_coco(write_coco(tmp_path / "a", doc))
    doc = coco_doc()
    doc["images"].append(copy.deepcopy(doc["images"][0]))
    with pytest.raises(DataError, match="duplicate image id 1"):
        read_coco(write_coco(tmp_path / "b", doc))
    with pytest.raises(DataError, match="file not found"):
        read_coco(tmp_path / "nothing.json")
