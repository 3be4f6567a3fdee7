"""Raw datasets as ``frcnn prepare`` reads them: PASCAL VOC folders and COCO annotation files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

Obj = tuple  # (name, (xmin, ymin, xmax, ymax), difficult)


def voc_xml(filename: str, size: tuple[int, int] | None, objects: Sequence[Obj]) -> str:
    """A VOC annotation document (``size`` None: no ``<size>`` element)."""
    parts = [f"<annotation><folder>JPEGImages</folder><filename>{filename}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{box[0]}</xmin>"
            f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc(root: Path, images: dict[str, Sequence[Obj]], *, size: tuple[int, int] = (64, 48),
              imagesets: dict[str, Sequence[str]] | None = None) -> Path:
    """A VOC folder with one ``size`` JPEG (a distinct flat colour) per entry of ``images``."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for i, (image_id, objects) in enumerate(sorted(images.items())):
        Image.new("RGB", size, (20 * i % 256, 100, 150)).save(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            voc_xml(f"{image_id}.jpg", size, objects), encoding="utf-8")
    if imagesets is not None:
        main = root / "ImageSets" / "Main"
        main.mkdir(parents=True, exist_ok=True)
        for split, ids in imagesets.items():
            (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return root


def coco_doc() -> dict[str, Any]:
    """Three 80 x 40 images, two categories (ids 7 and 3), one crowd box, one image unannotated."""
    return {
        "images": [{"id": 1, "file_name": "one.png", "width": 80, "height": 40},
                   {"id": 2, "file_name": "two.png", "width": 80, "height": 40},
                   {"id": 3, "file_name": "three.png", "width": 80, "height": 40}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0.5, 1.5, 30, 20], "iscrowd": 1},
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [40, 10, 35, 25]},
        ],
        "categories": [{"id": 7, "name": "zebra"}, {"id": 3, "name": "apple"}],
    }


def write_coco(folder: Path, doc: dict[str, Any] | None = None, *, images_dir: str = "images") -> Path:
    """``folder/annotations.json`` plus a PNG per image entry in ``folder/<images_dir>``."""
    doc = coco_doc() if doc is None else doc
    (folder / images_dir).mkdir(parents=True, exist_ok=True)
    for entry in doc["images"]:
        Image.new("RGB", (entry["width"], entry["height"]), (90, 60, 30)).save(
            folder / images_dir / entry["file_name"])
    path = folder / "annotations.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path
