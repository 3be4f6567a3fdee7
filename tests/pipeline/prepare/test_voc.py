"""PASCAL VOC reader: boxes, difficult, classes, ImageSets, and every malformed-input case.

:func:`tests.support.datasets.write_voc` builds the small VOC folders.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.prepare.records import DataError
from pipeline.prepare.voc import MAX_XML_BYTES, read_imagesets, read_voc
from tests.support.datasets import voc_xml, write_voc

GOOD = {
    "a": [("cat", (1, 2, 30, 40), False), ("dog", (10, 10, 60, 45), True)],
    "b": [("dog", (5.5, 6, 20, 21.25), False)],
    "c": [],
}


def test_reads_boxes_labels_difficult_and_sorted_classes(tmp_path):
    root = write_voc(tmp_path / "voc", GOOD)
    reading = read_voc(root)
    assert reading.problems == []
    assert reading.classes == ("cat", "dog")
    assert [item.image_id for item in reading.items] == ["a", "b", "c"]
    a, b, c = reading.items
    np.testing.assert_array_equal(a.boxes, [[1, 2, 30, 40], [10, 10, 60, 45]])  # as written
    assert a.labels.tolist() == [1, 2] and a.difficult.tolist() == [False, True]
    np.testing.assert_array_equal(b.boxes, [[5.5, 6, 20, 21.25]])
    assert c.boxes.shape == (0, 4) and c.labels.shape == (0,)   # no objects: all background
    assert a.path == root / "JPEGImages" / "a.jpg" and a.source == str(a.path)
    assert a.declared_size == (64, 48)
    assert reading.splits is None and reading.listed_ids == ["a", "b", "c"]


def test_explicit_classes_set_the_ids_and_refuse_others(tmp_path):
    root = write_voc(tmp_path / "voc", GOOD)
    reading = read_voc(root, classes=["dog", "cat", "bird"])
    assert reading.classes == ("dog", "cat", "bird")
    assert reading.items[0].labels.tolist() == [2, 1]
    only_dogs = read_voc(root, classes=["dog"])
    assert [item.image_id for item in only_dogs.items] == ["b", "c"]
    (problem,) = only_dogs.problems
    assert problem.image_id == "a" and problem.box_index == 0
    assert problem.source.endswith("a.xml") and "unknown class 'cat'" in problem.reason


@pytest.mark.parametrize("xml, fragment", [
    ("<annotation><object>", "malformed XML"),
    ("not xml at all", "malformed XML"),
    ("<other/>", "root element is <other>"),
    ('<!DOCTYPE a [<!ENTITY x "y">]><annotation/>', "DTD or entity"),
    (voc_xml("a.jpg", (64, 48), [("cat", (1, 2, "x", 4), False)]), "'x' is not a number"),
    (voc_xml("a.jpg", (64, 48), [("cat", (1, 2, 3, "nan"), False)]), "not a finite number"),
    (voc_xml("a.jpg", (64, 48), [("cat", (10, 2, 10, 40), False)]), "zero-area box [10, 2, 10, 40]"),
    (voc_xml("a.jpg", (64, 48), [("cat", (10, 40, 20, 30), False)]), "zero-area box"),
    (voc_xml("a.jpg", (64, 48), [("", (1, 2, 3, 4), False)]), "without <name>"),
    ("<annotation><filename>a.jpg</filename><object><name>cat</name></object></annotation>",
     "without <bndbox>"),
    (voc_xml("a.jpg", (64, 48), [("cat", (1, 2, 3, 4), 2)]), "<difficult> '2'"),
    (voc_xml("a.jpg", ("w", 48), []), "malformed <size>"),
    (voc_xml("missing.jpg", (64, 48), []), "image file not found"),
    (voc_xml("../../secret.jpg", (64, 48), []), "leads outside the dataset folder"),
    (voc_xml("/etc/passwd", (64, 48), []), "leads outside the dataset folder"),
])
def test_bad_annotation_is_a_problem_naming_the_file(tmp_path, xml, fragment):
    root = write_voc(tmp_path / "voc", {"a": [], "b": GOOD["b"]})
    (tmp_path / "secret.jpg").write_bytes(b"not for reading")
    (root / "Annotations" / "a.xml").write_text(xml, encoding="utf-8")
    reading = read_voc(root)
    assert [item.image_id for item in reading.items] == ["b"]
    assert len(reading.problems) == 1
    problem = reading.problems[0]
    assert problem.image_id == "a" and fragment in problem.reason
    assert problem.source.endswith(("a.xml", "missing.jpg"))
    assert problem.message().startswith(problem.source + ": ")
    assert reading.listed_ids == ["a", "b"]


def test_oversized_annotation_is_refused_unparsed(tmp_path):
    root = write_voc(tmp_path / "voc", {"a": []})
    (root / "Annotations" / "a.xml").write_bytes(b"<annotation>" + b" " * MAX_XML_BYTES + b"</annotation>")
    (problem,) = read_voc(root).problems
    assert "too large" in problem.reason


def test_every_problem_of_an_image_is_reported_with_its_index(tmp_path):
    root = write_voc(tmp_path / "voc", {"a": [("cat", (1, 1, 9, 9), False), ("cat", (5, 5, 5, 5), False),
                                              ("cat", (7, 1, 3, 9), False)]})
    reading = read_voc(root)
    assert reading.items == []
    assert [p.box_index for p in reading.problems] == [1, 2]


@pytest.mark.parametrize("layout, fragment", [
    ("nothing", "dataset folder not found"),
    ("no_annotations", "Annotations: folder not found"),
    ("empty", "no annotation files"),
])
def test_unreadable_dataset_raises(tmp_path, layout, fragment):
    root = tmp_path / "voc"
    if layout != "nothing":
        root.mkdir()
    if layout == "empty":
        (root / "Annotations").mkdir()
    with pytest.raises(DataError, match=fragment):
        read_voc(root)


def test_imagesets_give_the_images_and_their_splits(tmp_path):
    images = {f"im{i}": [("cat", (1, 1, 9, 9), False)] for i in range(6)}
    root = write_voc(tmp_path / "voc", images,
                     imagesets={"train": ["im0", "im1", "im2"], "val": ["im3"], "test": ["im5"]})
    reading = read_voc(root, use_imagesets=True)
    assert reading.splits == {"im0": "train", "im1": "train", "im2": "train", "im3": "val",
                              "im5": "test"}
    assert [item.image_id for item in reading.items] == ["im0", "im1", "im2", "im3", "im5"]


def test_imagesets_errors(tmp_path):
    root = write_voc(tmp_path / "voc", {"a": [], "b": []}, imagesets={"val": ["a"]})
    with pytest.raises(DataError, match="train.txt: not found"):
        read_imagesets(root)
    root = write_voc(tmp_path / "voc2", {"a": [], "b": []}, imagesets={"train": ["a", "b"], "test": ["b"]})
    with pytest.raises(DataError, match=r"test.txt: line 1: 'b' is already listed in train.txt"):
        read_voc(root, use_imagesets=True)
    root = write_voc(tmp_path / "voc3", {"a": []}, imagesets={"train": ["a", "../../x", "gone"]})
    problems = {p.image_id: p.reason for p in read_voc(root, use_imagesets=True).problems}
    assert problems == {"../../x": "image id leads outside the Annotations folder",
                        "gone": "annotation file not found"}


def test_missing_filename_element_falls_back_to_the_id(tmp_path):
    root = write_voc(tmp_path / "voc", {"a": GOOD["b"]})
    xml = (root / "Annotations" / "a.xml").read_text().replace("<filename>a.jpg</filename>", "")
    (root / "Annotations" / "a.xml").write_text(xml)
    (item,) = read_voc(root).items
    assert item.path == root / "JPEGImages" / "a.jpg"
