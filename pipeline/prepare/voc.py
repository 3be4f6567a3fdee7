"""PASCAL VOC-style folders: ``Annotations/*.xml``, ``JPEGImages/``, optional ``ImageSets/Main``.

One image per annotation file; its id is the file's stem. The image is
``JPEGImages/<filename>`` (``<filename>`` from the XML, else ``<id>.jpg``). ``<difficult>1``
objects are kept and flagged. Box values are used as written (see :mod:`pipeline.prepare`).

Defences: an annotation file larger than ``MAX_XML_BYTES`` or declaring a DTD or entities is
refused before parsing (the standard library parser is then safe: no external entities, no
entity expansion); an image path (``<filename>`` or an ImageSets id) that resolves outside the
dataset folder, e.g. ``../../x`` or an absolute path, is refused.

With ``use_imagesets``, the images are those listed in ``ImageSets/Main/{train,val,test}.txt``
(``train.txt`` required) and each keeps the split it is listed in.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.prepare.records import (DataError, ImageItem, Problem, Reading, box_problem,
                                       unusable_path)

MAX_XML_BYTES = 8 * 1024 * 1024
SPLIT_FILES = ("train", "val", "test")


@dataclass(frozen=True)
class VOCObject:
    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass(frozen=True)
class VOCAnnotation:
    """One parsed annotation file (not yet checked against a class list)."""

    image_id: str
    xml_path: Path
    image_path: Path
    declared_size: tuple[int, int] | None
    objects: tuple[VOCObject, ...]


def read_voc(root: str | Path, *, classes: Sequence[str] | None = None,
             use_imagesets: bool = False) -> Reading:
    """Read a VOC folder's annotations (images are decoded later, by the workers).

    Args:
        root: the dataset folder.
        classes: the class list (ids 1..K in this order); None: every name found in the
            accepted annotations, sorted.
        use_imagesets: take the image list and split from ``ImageSets/Main``.
    Raises:
        DataError: the folder or its ``Annotations`` is missing, the ImageSets are inconsistent,
            or the dataset lists no image. Per-image faults are returned as problems instead.
    """
    root = Path(root)
    ann_dir = root / "Annotations"
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if not ann_dir.is_dir():
        raise DataError(f"{ann_dir}: folder not found (a VOC dataset has Annotations/*.xml and "
                        f"JPEGImages/)")
    splits = read_imagesets(root) if use_imagesets else None
    ids = sorted(splits) if splits is not None else sorted(p.stem for p in ann_dir.glob("*.xml"))
    if not ids:
        raise DataError(f"{ann_dir}: no annotation files (*.xml): the dataset is empty")

    problems: list[Problem] = []
    parsed: list[VOCAnnotation] = []
    for image_id in ids:
        annotation, found = parse_annotation(root, image_id)
        problems.extend(found)
        if annotation is not None and not found:
            parsed.append(annotation)

    names = tuple(classes) if classes is not None else tuple(
        sorted({obj.name for ann in parsed for obj in ann.objects}))
    index = {name: i + 1 for i, name in enumerate(names)}
    items = []
    for ann in parsed:
        unknown = [Problem(str(ann.xml_path), f"unknown class {obj.name!r}; classes: "
                                              f"{', '.join(names)}", ann.image_id, i)
                   for i, obj in enumerate(ann.objects) if obj.name not in index]
        if unknown:
            problems.extend(unknown)
            continue
        items.append(ImageItem.make(
            ann.image_id, str(ann.image_path),
            [obj.box for obj in ann.objects], [index[obj.name] for obj in ann.objects],
            [obj.difficult for obj in ann.objects],
            path=ann.image_path, declared_size=ann.declared_size))
    return Reading(items=items, classes=names, problems=problems, splits=splits, listed_ids=ids)


def read_imagesets(root: Path) -> dict[str, str]:
    """``ImageSets/Main/{train,val,test}.txt`` -> ``{image_id: split}``.

    Raises:
        DataError: ``train.txt`` is missing, or an id is listed in two splits.
    """
    main = root / "ImageSets" / "Main"
    if not (main / "train.txt").is_file():
        raise DataError(f"{main / 'train.txt'}: not found (data.split=imagesets needs it)")
    splits: dict[str, str] = {}
    for split in SPLIT_FILES:
        path = main / f"{split}.txt"
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from None
        for line_no, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            image_id = fields[0]
            if image_id in splits:
                raise DataError(f"{path}: line {line_no}: {image_id!r} is already listed in "
                                f"{splits[image_id]}.txt")
            splits[image_id] = split
    return splits


def parse_annotation(root: Path, image_id: str) -> tuple[VOCAnnotation | None, list[Problem]]:
    """Parse ``Annotations/<image_id>.xml``; any problem found rejects the image."""
    xml_path = root / "Annotations" / f"{image_id}.xml"
    src = str(xml_path)

    def fail(reason: str, box_index: int | None = None) -> tuple[None, list[Problem]]:
        return None, [Problem(src, reason, image_id, box_index)]

    unusable = unusable_path(xml_path)
    if unusable:
        return fail(f"image id {image_id[:100]!r}: {unusable}")
    if not _inside(xml_path, root / "Annotations"):
        return fail("image id leads outside the Annotations folder")
    if not xml_path.is_file():
        return fail("annotation file not found")
    size = xml_path.stat().st_size
    if size > MAX_XML_BYTES:
        return fail(f"annotation file too large ({size} bytes > {MAX_XML_BYTES})")
    data = xml_path.read_bytes()
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        return fail("malformed XML: DTD or entity declarations are not allowed")
    try:
        tree = ET.fromstring(data)
    except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError, ValueError: encoding
        return fail(f"malformed XML: {exc}")
    if tree.tag != "annotation":
        return fail(f"malformed XML: root element is <{tree.tag}>, expected <annotation>")

    filename = (tree.findtext("filename") or "").strip() or f"{image_id}.jpg"
    image_path = root / "JPEGImages" / filename
    unusable = unusable_path(image_path)
    if unusable:
        return fail(f"<filename> {filename[:100]!r}: {unusable}")
    if not _inside(image_path, root):
        return fail(f"<filename> {filename!r} leads outside the dataset folder")
    if not image_path.is_file():
        return None, [Problem(str(image_path), "image file not found", image_id)]

    declared = None
    if tree.find("size") is not None:
        try:
            w, h = (_number(tree.findtext(f"size/{k}")) for k in ("width", "height"))
        except ValueError as exc:
            return fail(f"malformed <size>: {exc}")
        if w > 0 and h > 0:  # 0 (or absent) means "not stated": some tools write zeros
            declared = (int(w), int(h))

    objects, problems = [], []
    for i, node in enumerate(tree.iter("object")):
        name = (node.findtext("name") or "").strip()
        bndbox = node.find("bndbox")
        if not name:
            problems.append(Problem(src, "malformed XML: <object> without <name>", image_id, i))
            continue
        if bndbox is None:
            problems.append(Problem(src, "malformed XML: <object> without <bndbox>", image_id, i))
            continue
        try:
            box = tuple(_number(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = _flag(node.findtext("difficult"))
        except ValueError as exc:
            problems.append(Problem(src, f"malformed XML: {exc}", image_id, i))
            continue
        reason = box_problem(box)
        if reason:
            problems.append(Problem(src, reason, image_id, i))
            continue
        objects.append(VOCObject(name, box, difficult))  # type: ignore[arg-type]
    annotation = VOCAnnotation(image_id, xml_path, image_path, declared, tuple(objects))
    return annotation, problems


def _number(text: str | None) -> float:
    if text is None or not text.strip():
        raise ValueError("missing value")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text.strip()!r} is not a finite number")
    return value


def _flag(text: str | None) -> bool:
    value = (text or "0").strip().lower()
    if value in ("0", "false", ""):
        return False
    if value in ("1", "true"):
        return True
    raise ValueError(f"<difficult> {value!r} is not 0 or 1")


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``folder``."""
    return path.resolve().is_relative_to(folder.resolve())
