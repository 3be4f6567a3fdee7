"""COCO detection JSON: ``images``, ``annotations`` (``bbox`` = x, y, w, h), ``categories``.

Image ids are ``str(image["id"])``; the image file is ``<image_root>/<file_name>``
(``image_root`` defaults to the ``images/`` folder beside the JSON) and must stay inside
``image_root``. Classes are the categories in id order, or ``data.classes`` (matched by name).
``iscrowd: 1`` boxes are kept and flagged ``crowd`` (training drops them; recall and AP leave
them out, as COCO's own evaluation does). An image without annotations
is kept (all background).

A file that is not valid JSON or lacks the three top-level lists is refused whole
(:class:`DataError`); a malformed image entry or annotation rejects only its image.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from pipeline.prepare.records import (DataError, ImageItem, Problem, Reading, box_problem,
                                       unusable_path)


def read_coco(json_path: str | Path, *, image_root: str | Path | None = None,
              classes: Sequence[str] | None = None) -> Reading:
    """Read a COCO JSON file's annotations (images are decoded later, by the workers).

    Args:
        json_path: the annotation file.
        image_root: folder the ``file_name`` s are relative to (default: ``images/`` beside
            the JSON).
        classes: class names, ids 1..K in this order; None: the file's categories by id.
    Raises:
        DataError: the file is missing, not JSON, or not a COCO detection file; its
            categories are inconsistent; or it lists no image.
    """
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent / "images"
    src = str(json_path)
    doc = _load_document(json_path)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (set data.image_root)")
    category_names = _categories(doc["categories"], src)
    names = tuple(classes) if classes is not None else tuple(
        category_names[k] for k in sorted(category_names))
    problems: list[Problem] = []
    images, listed = _index_images(doc["images"], root, src, problems)
    per_image, bad_images = _group_annotations(doc["annotations"], listed, category_names,
                                               names, src, problems)
    items = []
    for image_id in sorted(images):
        if image_id in bad_images:
            continue
        entry = images[image_id]
        anns = per_image.get(image_id, [])
        path = root / entry["file_name"]
        items.append(ImageItem.make(
            image_id, str(path), [a[0] for a in anns], [a[1] for a in anns], [False] * len(anns),
            crowd=[a[2] for a in anns], path=path, declared_size=(int(entry["width"]), int(entry["height"]))))
    return Reading(items=items, classes=names, problems=problems, listed_ids=sorted(listed))


def _load_document(json_path: Path) -> dict[str, Any]:
    """The parsed file, checked to be a COCO detection document with at least one image."""
    src = str(json_path)
    if not json_path.is_file():
        raise DataError(f"{src}: file not found")
    try:
        doc = json.loads(json_path.read_bytes())
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, UTF-8, digits
        raise DataError(f"{src}: malformed JSON: {str(exc)[:300]}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{src}: malformed COCO file: expected an object at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{src}: malformed COCO file: {key!r} must be a list")
    if not doc["images"]:
        raise DataError(f"{src}: no images: the dataset is empty")
    return doc


def _index_images(entries: list[Any], root: Path, src: str, problems: list[Problem]
                  ) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """``({image id: usable entry}, every listed id)``; refused entries go to ``problems``."""
    images: dict[str, dict[str, Any]] = {}
    listed: set[str] = set()
    for i, entry in enumerate(entries):
        image_id, problem = _image_entry(entry, i, root, src)
        if image_id is not None:
            if image_id in listed:
                raise DataError(f"{src}: images[{i}]: duplicate image id {image_id}")
            listed.add(image_id)
        if problem is not None:
            problems.append(problem)
        elif image_id is not None:
            images[image_id] = entry
    return images, listed


def _group_annotations(annotations: list[Any], listed: set[str], category_names: dict[int, str],
                       names: tuple[str, ...], src: str, problems: list[Problem]
                       ) -> tuple[dict[str, list[tuple[list[float], int, bool]]], set[str]]:
    """``({image id: [(box, label, crowd), ...]}, ids of images with a refused annotation)``."""
    label_of = {name: i + 1 for i, name in enumerate(names)}
    per_image: dict[str, list[tuple[list[float], int, bool]]] = defaultdict(list)
    bad_images: set[str] = set()
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
        if not isinstance(ann, dict) or "image_id" not in ann:
            problems.append(Problem(src, f"{where}: malformed annotation (no image_id)"))
            continue
        image_id = str(ann["image_id"])
        if image_id not in listed:
            problems.append(Problem(src, f"{where}: image_id {ann['image_id']} is not in 'images'"))
            continue
        index = len(per_image[image_id])
        per_image[image_id].append(([], 0, False))  # placeholder keeps box indices stable
        reason, value = _annotation(ann, category_names, label_of, names)
        if reason is not None:
            problems.append(Problem(src, f"{where}: {reason}", image_id, index))
            bad_images.add(image_id)
            continue
        per_image[image_id][index] = value
    return per_image, bad_images


def _categories(categories: list[Any], src: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) \
                or not isinstance(cat.get("name"), str) or not cat["name"]:
            raise DataError(f"{src}: categories[{i}]: expected {{'id': int, 'name': str}}, got {cat!r}")
        if cat["id"] in names:
            raise DataError(f"{src}: categories[{i}]: duplicate category id {cat['id']}")
        if cat["name"] in names.values():
            raise DataError(f"{src}: categories[{i}]: duplicate category name {cat['name']!r}")
        names[cat["id"]] = cat["name"]
    return names


def _image_entry(entry: Any, i: int, root: Path, src: str) -> tuple[str | None, Problem | None]:
    """``(image id or None, problem or None)`` for ``images[i]``."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), (int, str)) \
            or isinstance(entry.get("id"), bool):
        return None, Problem(src, f"images[{i}]: malformed image entry (needs an id)")
    image_id = str(entry["id"])
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        return image_id, Problem(src, f"images[{i}]: missing file_name", image_id)
    for key in ("width", "height"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1 \
                or (isinstance(value, float) and not value.is_integer()):
            return image_id, Problem(src, f"images[{i}]: {key} {value!r} is not a positive integer",
                                     image_id)
    path = root / file_name
    unusable = unusable_path(path)
    if unusable:
        return image_id, Problem(src, f"images[{i}]: file_name {file_name[:100]!r}: {unusable}",
                                 image_id)
    if not path.resolve().is_relative_to(root.resolve()):
        return image_id, Problem(src, f"images[{i}]: file_name {file_name!r} leads outside the "
                                      f"image folder {root}", image_id)
    if not path.is_file():
        return image_id, Problem(str(path), "image file not found", image_id)
    return image_id, None


def _annotation(ann: dict[str, Any], category_names: dict[int, str], label_of: dict[str, int],
                names: Sequence[str]) -> tuple[str | None, Any]:
    """``(reason, None)`` or ``(None, (box x1y1x2y2, label, crowd))`` for one annotation."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 1e300
            and math.isfinite(v) for v in bbox):  # abs() first: math.isfinite(10**400) raises
        return f"malformed bbox {bbox!r} (expected [x, y, w, h])", None
    x, y, w, h = (float(v) for v in bbox)
    box = [x, y, x + w, y + h]
    reason = box_problem(box)
    if reason is not None:
        return reason.replace("x2 <= x1 or y2 <= y1", "w <= 0 or h <= 0"), None
    category = ann.get("category_id")
    if not isinstance(category, int) or category not in category_names:
        return f"unknown class: category_id {category!r} is not in 'categories'", None
    name = category_names[category]
    if name not in label_of:
        return f"unknown class {name!r}; classes: {', '.join(names)}", None
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1):
        return f"iscrowd {crowd!r} is not 0 or 1", None
    return None, (box, label_of[name], bool(crowd))
