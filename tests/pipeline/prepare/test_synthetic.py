"""The synthetic set: deterministic, varied, boxes tight around what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.prepare import synthetic
from pipeline.prepare.synthetic import (CANVAS, MAX_OBJECTS, SHAPES, boxes_and_labels,
                                        class_names, layout, read_synthetic, render)


def test_same_seed_same_pixels_and_boxes():
    image_a, objects_a = render(7, 3, 4)
    image_b, objects_b = render(7, 3, 4)
    assert objects_a == objects_b
    assert image_a.tobytes() == image_b.tobytes()
    assert render(8, 3, 4)[0].tobytes() != image_a.tobytes()
    assert render(7, 4, 4)[0].tobytes() != image_a.tobytes()


def test_layout_matches_render():
    for index in range(5):
        assert layout(0, index, 6) == render(0, index, 6)[1]


def test_layout_statistics_span_the_anchor_scales():
    objects = [layout(0, i, 12) for i in range(300)]
    counts = [len(objs) for objs in objects]
    assert min(counts) == 1 and max(counts) == MAX_OBJECTS
    boxes = np.concatenate([boxes_and_labels(objs)[0] for objs in objects])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= CANVAS).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    assert sides.min() < 32 and sides.max() > 450          # ~24 .. 560 pixels
    assert ((sides > 100) & (sides < 300)).sum() > 50       # and in between
    labels = np.concatenate([boxes_and_labels(objs)[1] for objs in objects])
    assert set(labels.tolist()) == set(range(1, 13))
    overlapping = sum(_any_overlap(boxes_and_labels(objs)[0]) for objs in objects)
    assert 0.2 * len(objects) < overlapping < len(objects)  # some images overlap, not all


def _any_overlap(boxes: np.ndarray) -> bool:
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            iw = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            ih = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            if iw > 0 and ih > 0:
                return True
    return False


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w, h", [(8, 8), (24, 13), (90, 300), (560, 280)])
def test_every_shape_touches_all_four_sides_of_its_box(shape, w, h):
    mask = synthetic._shape_mask(shape, w, h)
    assert mask.shape == (h, w)
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_object_pixels_stay_inside_their_box():
    """Draw one image object by object onto a flat canvas: nothing changes outside the boxes."""
    rng = np.random.default_rng(0)
    for obj in layout(1, 2, 12):
        pixels = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
        synthetic._draw_object(pixels, obj, rng)
        changed = pixels.any(axis=2)
        ys, xs = np.nonzero(changed)
        assert xs.min() >= obj.x0 and xs.max() < obj.x1
        assert ys.min() >= obj.y0 and ys.max() < obj.y1


def test_class_names_and_reading():
    assert class_names(3) == ("rectangle", "ellipse", "triangle")
    with pytest.raises(ValueError, match="1..12"):
        class_names(13)
    reading = read_synthetic(num_images=5, num_classes=3, seed=4)
    assert [item.image_id for item in reading.items] == [f"synthetic_{i:06d}" for i in range(5)]
    assert reading.listed_ids == [item.image_id for item in reading.items]
    item = reading.items[2]
    boxes, labels = boxes_and_labels(layout(4, 2, 3))
    np.testing.assert_array_equal(item.boxes, boxes)
    np.testing.assert_array_equal(item.labels, labels)
    assert item.labels.min() >= 1 and item.labels.max() <= 3
    assert item.source == "synthetic:4:2" and item.declared_size == (CANVAS, CANVAS)
