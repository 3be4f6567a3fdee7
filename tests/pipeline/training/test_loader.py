"""pipeline.data: Parquet -> tensors, normalisation, flip, collate, sharding.

:func:`write_prepared` (also used by the training tests) writes a tiny prepared set in the
schema of ``frcnn prepare``: PIL-drawn rectangles and their boxes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline import data

COLOURS = [(230, 40, 40), (40, 200, 40), (40, 40, 230), (230, 230, 40)]


def _image(rng: np.random.Generator, size: int, num_classes: int) -> tuple[bytes, list, list]:
    img = Image.new("RGB", (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, 4))):
        w, h = rng.integers(size // 5, size // 2, size=2)
        x1, y1 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        label = int(rng.integers(1, num_classes + 1))
        draw.rectangle([x1, y1, x1 + w - 1, y1 + h - 1], fill=COLOURS[(label - 1) % len(COLOURS)])
        boxes.append([float(x1), float(y1), float(x1 + w), float(y1 + h)])
        labels.append(label)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), boxes, labels


def write_prepared(folder: Path, *, size: int = 64, num_images: int = 6, num_classes: int = 2,
                   seed: int = 0, num_eval: int = 2) -> Path:
    """``folder/{train,val,test}.parquet`` (``num_images`` training images, ``num_eval`` each
    for val and test) + ``classes.json``; returns ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_images), ("val", num_eval), ("test", num_eval)):
        rows = []
        for i in range(n):
            png, boxes, labels = _image(rng, size, num_classes)
            rows.append({"image_id": f"{split}_{i:03d}", "source": "fixture",
                         "orig_width": size, "orig_height": size, "image": png, "boxes": boxes,
                         "labels": labels, "difficult": [False] * len(labels)})
        pd.DataFrame(rows).to_parquet(folder / f"{split}.parquet", index=False)
    classes = [f"class{i}" for i in range(1, num_classes + 1)]
    (folder / "classes.json").write_text(json.dumps({"classes": classes, "image_size": size}))
    return folder


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "prepared")


def test_dataset_item_shapes_and_normalisation(prepared):
    ds = data.DetectionDataset(prepared / "train.parquet")
    assert len(ds) == 6
    image, target, image_id = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert target["boxes"].shape[1] == 4 and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64 and target["labels"].min() >= 1
    assert image_id == "train_000"
    # plain 0-1 RGB (the detector normalises): the grey background is 90 / 255
    assert image.min() >= 0 and image.max() <= 1
    grey = torch.isclose(image, torch.tensor(90 / 255)).all(dim=0)
    assert grey.any()


def test_hflip_mirrors_image_and_boxes():
    image = torch.zeros(3, 8, 10)
    image[:, 2:4, 1:3] = 1.0  # pixels x = 1, 2 -> box x1=1, x2=3
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    flipped, fboxes = data.hflip(image, boxes)
    assert torch.equal(fboxes, torch.tensor([[7.0, 2.0, 9.0, 4.0]]))
    assert flipped[0, 2:4, 7:9].eq(1).all() and flipped.sum() == image.sum()
    back, bboxes = data.hflip(flipped, fboxes)
    assert torch.equal(back, image) and torch.equal(bboxes, boxes)


def test_flip_is_deterministic_per_seed_epoch_index(prepared):
    ds = data.DetectionDataset(prepared / "train.parquet", hflip=0.5, seed=3)
    decisions = [[data.flip_decision(3, e, i, 0.5) for i in range(len(ds))] for e in range(4)]
    assert decisions == [[data.flip_decision(3, e, i, 0.5) for i in range(len(ds))]
                         for e in range(4)]
    assert any(any(d) for d in decisions) and not all(all(d) for d in decisions)
    plain = data.DetectionDataset(prepared / "train.parquet", hflip=0.0)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, target, _ = ds[i]
            ref_image, ref_target, _ = plain[i]
            if decisions[epoch][i]:
                ref_image, ref_boxes = data.hflip(ref_image, ref_target["boxes"])
            else:
                ref_boxes = ref_target["boxes"]
            assert torch.equal(image, ref_image) and torch.equal(target["boxes"], ref_boxes)


def test_difficult_boxes_dropped_unless_asked(tmp_path):
    folder = write_prepared(tmp_path / "p", num_images=1)
    frame = pd.read_parquet(folder / "train.parquet")
    n = len(frame.loc[0, "labels"])
    frame.at[0, "difficult"] = [True] + [False] * (n - 1)
    frame.to_parquet(folder / "train.parquet", index=False)
    assert len(data.DetectionDataset(folder / "train.parquet")[0][1]["labels"]) == n - 1
    kept = data.DetectionDataset(folder / "train.parquet", use_difficult=True)[0][1]
    assert len(kept["labels"]) == n


def test_missing_column_is_named(tmp_path):
    folder = write_prepared(tmp_path / "p", num_images=1)
    pd.read_parquet(folder / "train.parquet").drop(columns=["labels"]).to_parquet(
        folder / "train.parquet", index=False)
    with pytest.raises(ValueError, match="labels"):
        data.DetectionDataset(folder / "train.parquet")


@pytest.mark.parametrize("n, world", [(6, 1), (6, 2), (7, 2), (5, 4)])
def test_shards_cover_everything_with_equal_sizes(n, world):
    shards = []
    for rank in range(world):
        sampler = data.ShardSampler(n, rank=rank, world_size=world, seed=1)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    assert len({len(s) for s in shards}) == 1
    assert set().union(*shards) == set(range(n))
    # a new epoch reshuffles
    other = data.ShardSampler(n, rank=0, world_size=world, seed=1)
    other.set_epoch(3)
    assert len(list(other)) == len(shards[0])


def test_shard_start_skips_consumed_indices():
    sampler = data.ShardSampler(10, rank=1, world_size=2, seed=0)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, start=3)
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3


def test_loader_batches_decode_in_workers(prepared):
    ds = data.DetectionDataset(prepared / "train.parquet", hflip=0.5)
    sampler = data.ShardSampler(len(ds), rank=0, world_size=2)
    loader = data.make_loader(ds, sampler, batch_size=2, num_workers=1)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["images"].shape == (2, 3, 64, 64)
    assert len(batches[0]["targets"]) == 2 and len(batches[0]["image_ids"]) == 2


def test_read_classes(prepared, tmp_path):
    info = data.read_classes(prepared)
    assert info["classes"] == ["class1", "class2"] and info["image_size"] == 64
    with pytest.raises(FileNotFoundError, match="frcnn prepare"):
        data.read_classes(tmp_path / "nothing")
