"""Bad input, fuzzed: the VOC and COCO readers (the ``--set`` / ``--params`` parsers:
:mod:`tests.reliability.test_fuzz_config`).

Fault: malformed, truncated, oversized and hostile input (non-UTF-8 bytes, deeply nested or
huge XML / JSON / YAML, NaN / inf / negative / astronomically large numbers, ``../../x`` and
absolute paths in file names, symlinks pointing outside the dataset or to themselves).
Must survive: every case ends in a clear error (``DataError`` / ``ConfigError`` naming the file
or key) or a documented skip (a :class:`Problem` that rejects the image), never another
exception, never a hang (each case is timed), and never a file opened outside the dataset folder
(every ``open`` is recorded through Python's audit hook).

Each test counts its examples in :data:`tests.support.fuzz.FUZZ_CASES`; the totals are
printed at the end of the run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pipeline.prepare.coco import read_coco
from pipeline.prepare.process import process_item
from pipeline.prepare.records import DataError, Problem
from pipeline.prepare.voc import read_voc
from tests.support.fuzz import (CASE_SECONDS, FUZZ, FUZZ_CASES, FUZZ_OUTCOMES, opened_outside,
                                watch_opens)


# --------------------------------------------------------------------------------------------
# A dataset folder with traps: a readable secret outside it, symlinks out and in loops


def _jpeg(size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()
BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + b"".join(b'<!ENTITY lol%d "%s">' % (i, b"&lol%d;" % (i - 1) * 10 if i > 1
                                                       else b"&lol;" * 10) for i in range(1, 10))
                  + b']><annotation><filename>&lol9;</filename></annotation>')
EXTERNAL_ENTITY = (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                   b"<annotation><filename>&x;</filename></annotation>")


def _trap_folder(base: Path, images_dir: str) -> Path:
    """``base/outside/secret.jpg`` (a valid image: reading it would succeed) and, in
    ``base/data/<images_dir>``: ``ok.jpg``, ``link_out.jpg`` -> the secret, ``dir_out`` -> the
    outside folder, ``loop.jpg`` -> itself. Returns ``base/data``."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(JPEG)
    (outside / "secret.xml").write_text("<annotation><filename>ok.jpg</filename></annotation>")
    root = base / "data"
    images = root / images_dir
    images.mkdir(parents=True)
    (images / "ok.jpg").write_bytes(JPEG)
    os.symlink(outside / "secret.jpg", images / "link_out.jpg")
    os.symlink(outside, images / "dir_out")
    os.symlink("loop.jpg", images / "loop.jpg")
    return root


PLAIN_NAMES = st.sampled_from(["ok.jpg", "fuzz.jpg"])
FILE_NAMES = st.one_of(
    PLAIN_NAMES, PLAIN_NAMES,  # one_of picks a branch uniformly: repeating one weighs it
    st.sampled_from(["ok.jpg", "../../outside/secret.jpg", "../outside/secret.jpg", "/etc/passwd",
                     "link_out.jpg", "dir_out/secret.jpg", "loop.jpg", "dir_out", "..", ".", "",
                     "x" * 5000, "a/" * 3000 + "ok.jpg", "fuzz.jpg", "../data/JPEGImages/ok.jpg",
                     "%2e%2e/%2e%2e/outside/secret.jpg", "ok.jpg\x00.png", " ok.jpg ",
                     "\u202eok.jpg", "C:\\windows\\win.ini", "~/secret.jpg"]),
    st.text(max_size=40))
PLAUSIBLE = st.integers(min_value=0, max_value=16).map(str)
NUMBERS = st.one_of(
    PLAUSIBLE, PLAUSIBLE, PLAUSIBLE,
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "-1", "0", "", "abc", "1e-320",
                     "0x10", "1_0", " 12 ", "1" + "0" * 400, "1" + "0" * 5000, "12.5.3"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-10**6, max_value=10**6).map(str))


@st.composite
def voc_annotations(draw) -> bytes:
    """A VOC annotation: structured with hostile values, or raw, truncated, nested, DTD."""
    kind = draw(st.sampled_from(["structured", "structured", "raw", "truncated", "deep",
                                 "entities", "non_utf8"]))
    if kind == "raw":
        return draw(st.binary(max_size=2000))
    if kind == "entities":
        return draw(st.sampled_from([BILLION_LAUGHS, EXTERNAL_ENTITY, BILLION_LAUGHS.replace(
            b'<?xml version="1.0"?>', b"").decode().encode("utf-16")]))  # slips past the DTD check
    if kind == "deep":
        depth = draw(st.integers(min_value=1, max_value=200_000))
        return b"<annotation>" + b"<a>" * depth + b"</a>" * depth + b"</annotation>"
    parts = [f"<annotation><filename>{escape(draw(FILE_NAMES))}</filename>"]
    if draw(st.booleans()):
        width, height = draw(st.one_of(st.just(("16", "12")), st.tuples(NUMBERS, NUMBERS)))
        parts.append(f"<size><width>{escape(width)}</width>"
                     f"<height>{escape(height)}</height></size>")
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        name = draw(st.one_of(st.sampled_from(["cat", "dog"]), st.sampled_from(["cat", "dog", ""]),
                              st.text(max_size=10)))
        values = draw(st.one_of(st.just(("1", "2", "8", "6")), st.just(("0", "0", "16", "12")),
                                st.tuples(NUMBERS, NUMBERS, NUMBERS, NUMBERS)))
        box = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"),
                                                               values) if draw(st.integers(0, 9)))
        difficult = draw(st.sampled_from(["0", "1", "0", "2", "true", "", "x"]))
        parts.append(f"<object><name>{escape(name)}</name><difficult>{difficult}</difficult>"
                     + (f"<bndbox>{box}</bndbox>" if draw(st.integers(0, 9)) > 0 else "")
                     + "</object>")
    parts.append("</annotation>")
    text = "".join(parts)
    data = text.encode("utf-8", errors="surrogatepass")
    if kind == "non_utf8":
        data = b'<?xml version="1.0" encoding="' + draw(st.sampled_from(
            [b"utf-8", b"latin-1", b"bogus", b"utf-16", b"shift_jis"])) + b'"?>' + data + b"\xff\xfe"
    if kind == "truncated":
        data = data[:draw(st.integers(min_value=0, max_value=len(data)))]
    return data


IMAGE_BYTES = st.one_of(st.just(JPEG), st.binary(max_size=300),
                        st.integers(0, len(JPEG)).map(lambda n: JPEG[:n]))
IMAGESET_LINES = st.one_of(
    st.lists(st.sampled_from(["a", "b", "../../outside/secret", "/etc/passwd", "a\x00b", "x" * 5000,
                              "linked", "c d", ""]), max_size=5).map(
        lambda ids: "".join(f"{i}\n" for i in ids).encode("utf-8")),
    st.binary(max_size=200))


def _check_problems(problems: list[Problem], reader: str) -> None:
    FUZZ_OUTCOMES[f"{reader} problems"] += len(problems)
    for problem in problems:
        assert isinstance(problem, Problem) and problem.reason, problem
        assert isinstance(problem.message(), str) and problem.source in problem.message()


@pytest.mark.timeout(300)
@FUZZ
@given(annotations=st.lists(voc_annotations(), min_size=1, max_size=3), image=IMAGE_BYTES,
       imagesets=st.one_of(st.none(), st.none(), IMAGESET_LINES), linked_xml=st.booleans())
def test_voc_reader_survives_hostile_folders(annotations, image, imagesets, linked_xml):
    FUZZ_CASES["voc"] += 1
    base = Path(tempfile.mkdtemp(prefix="fuzz-voc-"))
    try:
        root = _trap_folder(base, "JPEGImages")
        (root / "Annotations").mkdir()
        (root / "JPEGImages" / "fuzz.jpg").write_bytes(image)
        for name, data in zip("abc", annotations):
            (root / "Annotations" / f"{name}.xml").write_bytes(data)
        if linked_xml:  # an annotation that is a symlink to a file outside the dataset
            os.symlink(base / "outside" / "secret.xml", root / "Annotations" / "linked.xml")
        if imagesets is not None:
            (root / "ImageSets" / "Main").mkdir(parents=True)
            (root / "ImageSets" / "Main" / "train.txt").write_bytes(imagesets)

        start = time.monotonic()
        with watch_opens() as opened:
            try:
                reading = read_voc(root, use_imagesets=imagesets is not None)
            except DataError as exc:
                assert str(exc)
                FUZZ_OUTCOMES["voc DataError"] += 1
                reading = None
            if reading is not None:
                _check_problems(reading.problems, "voc")
                for item in reading.items:
                    done = process_item(item, image_size=32, resize="stretch", image_format="png")
                    _check_problems(list(done.problems), "voc")
                    assert (done.row is None) != (not done.problems)
                    FUZZ_OUTCOMES["voc images prepared"] += done.row is not None
        assert time.monotonic() - start < CASE_SECONDS
        assert opened_outside(opened, root) == []
        if reading is not None:  # nothing that leads outside or loops was accepted
            for item in reading.items:
                assert item.path.resolve().is_relative_to(root.resolve())
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_voc_oversized_annotation_is_refused_unparsed(tmp_path):
    FUZZ_CASES["voc"] += 1
    root = _trap_folder(tmp_path, "JPEGImages")
    (root / "Annotations").mkdir()
    huge = b"<annotation>" + b"<object><name>x</name></object>" * 300_000 + b"</annotation>"
    (root / "Annotations" / "big.xml").write_bytes(huge)   # 9.3 MB > 8 MiB
    reading = read_voc(root)
    assert [p.reason for p in reading.problems] == [
        f"annotation file too large ({len(huge)} bytes > {8 * 1024 * 1024})"]


# --------------------------------------------------------------------------------------------
# COCO


HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6),
    st.sampled_from([10**400, -10**400, 2**63, 0, 1, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(0, 3),
                                                          max_size=2))
WIDTHS = st.one_of(st.just(16), st.just(16), st.just(12), HOSTILE_VALUES)   # ok.jpg is 16 x 12
HEIGHTS = st.one_of(st.just(12), st.just(12), st.just(16), HOSTILE_VALUES)
IDS = st.one_of(st.integers(1, 4), st.integers(1, 4), HOSTILE_VALUES)


def _valid_coco() -> dict:
    return {"images": [{"id": 1, "file_name": "ok.jpg", "width": 16, "height": 12},
                       {"id": 2, "file_name": "fuzz.jpg", "width": 16, "height": 12}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 8, 6]},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [4, 4, 10, 6],
                             "iscrowd": 1},
                            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 16, 12]}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}


def _leaves(doc, path=()):
    """Every (path, value) of a JSON document, containers included."""
    yield path, doc
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from _leaves(value, path + (key,))


@st.composite
def _mutated_coco(draw) -> dict:
    """A valid document with one to three values (any depth) replaced by hostile ones."""
    doc = _valid_coco()
    for _ in range(draw(st.integers(1, 3))):
        paths = sorted((path for path, _ in _leaves(doc) if path), key=len, reverse=True)
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = draw(st.one_of(HOSTILE_VALUES, FILE_NAMES))
    return doc


@st.composite
def coco_documents(draw) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "structured", "structured",
                                 "raw", "truncated", "deep", "digits", "non_utf8"]))
    if kind == "mutated":
        return json.dumps(draw(_mutated_coco())).encode("utf-8", errors="surrogatepass")
    if kind == "raw":
        return draw(st.binary(max_size=2000))
    if kind == "deep":
        depth = draw(st.integers(min_value=1, max_value=200_000))
        opener = draw(st.sampled_from([b"[", b'{"images":']))
        return opener * depth
    if kind == "digits":
        return (b'{"images": [{"id": 1, "file_name": "ok.jpg", "width": 1'
                + b"0" * draw(st.integers(300, 6000)) + b', "height": 12}], "annotations": [],'
                b' "categories": []}')
    images = [{"id": draw(st.one_of(st.just(k + 1), st.just(k + 1), IDS)),
               "file_name": draw(st.one_of(FILE_NAMES, FILE_NAMES, HOSTILE_VALUES)),
               "width": draw(WIDTHS), "height": draw(HEIGHTS)}
              for k in range(draw(st.integers(0, 3)))]
    valid_categories = st.just([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    categories = draw(st.one_of(
        valid_categories, valid_categories, valid_categories,
        st.lists(st.fixed_dictionaries({"id": HOSTILE_VALUES, "name": HOSTILE_VALUES}),
                 max_size=2)))
    coordinate = st.one_of(st.floats(-5, 20), st.floats(-5, 20), HOSTILE_VALUES)
    annotations = [{"id": draw(HOSTILE_VALUES), "image_id": draw(IDS),
                    "category_id": draw(st.one_of(st.integers(1, 2), HOSTILE_VALUES)),
                    "bbox": draw(st.one_of(st.lists(coordinate, min_size=4, max_size=4),
                                           st.lists(coordinate, min_size=3, max_size=5),
                                           HOSTILE_VALUES)),
                    "iscrowd": draw(st.one_of(st.sampled_from([0, 1]), HOSTILE_VALUES))}
                   for _ in range(draw(st.integers(0, 4)))]
    doc = {"images": images, "annotations": annotations, "categories": categories}
    if draw(st.integers(0, 9)) == 0:  # a top-level list replaced by something else
        doc[draw(st.sampled_from(list(doc)))] = draw(HOSTILE_VALUES)
    data = json.dumps(doc).encode("utf-8", errors="surrogatepass")  # NaN / Infinity included
    if kind == "truncated":
        data = data[:draw(st.integers(min_value=0, max_value=len(data)))]
    if kind == "non_utf8":
        data = data.replace(b"ok.jpg", b"ok\xff\xfe.jpg")
    return data


@pytest.mark.timeout(300)
@FUZZ
@given(doc=coco_documents(), image=IMAGE_BYTES)
def test_coco_reader_survives_hostile_files(doc, image):
    FUZZ_CASES["coco"] += 1
    base = Path(tempfile.mkdtemp(prefix="fuzz-coco-"))
    try:
        root = _trap_folder(base, "images")
        (root / "images" / "fuzz.jpg").write_bytes(image)
        json_path = root / "annotations.json"
        json_path.write_bytes(doc)

        start = time.monotonic()
        with watch_opens() as opened:
            try:
                reading = read_coco(json_path)
            except DataError as exc:
                assert str(exc)
                FUZZ_OUTCOMES["coco DataError"] += 1
                reading = None
            if reading is not None:
                _check_problems(reading.problems, "coco")
                for item in reading.items:
                    done = process_item(item, image_size=32, resize="letterbox",
                                        image_format="jpeg")
                    _check_problems(list(done.problems), "coco")
                    FUZZ_OUTCOMES["coco images prepared"] += done.row is not None
        assert time.monotonic() - start < CASE_SECONDS
        assert opened_outside(opened, root) == []
        if reading is not None:
            for item in reading.items:
                assert item.path.resolve().is_relative_to((root / "images").resolve())
    finally:
        shutil.rmtree(base, ignore_errors=True)
