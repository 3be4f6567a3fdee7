"""pipeline.training.loader: Parquet -> tensors, 0-1 images, flip, collate, the resumable sampler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.training import loader
from tests.support.factories import write_prepared


def test_dataset_item_shapes_and_normalisation(prepared):
    ds = loader.DetectionDataset(prepared / "train.parquet")
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
    flipped, fboxes = loader.hflip(image, boxes)
    assert torch.equal(fboxes, torch.tensor([[7.0, 2.0, 9.0, 4.0]]))
    assert flipped[0, 2:4, 7:9].eq(1).all() and flipped.sum() == image.sum()
    back, bboxes = loader.hflip(flipped, fboxes)
    assert torch.equal(back, image) and torch.equal(bboxes, boxes)


def test_flip_is_deterministic_per_seed_epoch_image(prepared):
    ds = loader.DetectionDataset(prepared / "train.parquet", hflip=0.5, seed=3)
    ids = [f"train_{i:03d}" for i in range(len(ds))]
    decisions = [[loader.flip_decision(3, e, i, 0.5) for i in ids] for e in range(4)]
    assert decisions == [[loader.flip_decision(3, e, i, 0.5) for i in ids] for e in range(4)]
    assert any(any(d) for d in decisions) and not all(all(d) for d in decisions)
    plain = loader.DetectionDataset(prepared / "train.parquet", hflip=0.0)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, target, _ = ds[i]
            ref_image, ref_target, _ = plain[i]
            if decisions[epoch][i]:
                ref_image, ref_boxes = loader.hflip(ref_image, ref_target["boxes"])
            else:
                ref_boxes = ref_target["boxes"]
            assert torch.equal(image, ref_image) and torch.equal(target["boxes"], ref_boxes)


def test_difficult_boxes_dropped_unless_asked(tmp_path):
    folder = write_prepared(tmp_path / "p", num_images=1)
    frame = pd.read_parquet(folder / "train.parquet")
    n = len(frame.loc[0, "labels"])
    frame.at[0, "difficult"] = [True] + [False] * (n - 1)
    frame.to_parquet(folder / "train.parquet", index=False)
    assert len(loader.DetectionDataset(folder / "train.parquet")[0][1]["labels"]) == n - 1
    kept = loader.DetectionDataset(folder / "train.parquet", use_difficult=True)[0][1]
    assert len(kept["labels"]) == n


def test_crowd_regions_never_train(tmp_path):
    folder = write_prepared(tmp_path / "p", num_images=1)
    frame = pd.read_parquet(folder / "train.parquet")
    n = len(frame.loc[0, "labels"])
    frame.at[0, "crowd"] = [False] * (n - 1) + [True]
    frame.to_parquet(folder / "train.parquet", index=False)
    for use_difficult in (False, True):
        got = loader.DetectionDataset(folder / "train.parquet", use_difficult=use_difficult)[0][1]
        torch.testing.assert_close(got["boxes"], torch.tensor(np.stack(frame.loc[0, "boxes"][:-1]),
                                                              dtype=torch.float32))


def test_missing_column_is_named(tmp_path):
    folder = write_prepared(tmp_path / "p", num_images=1)
    pd.read_parquet(folder / "train.parquet").drop(columns=["labels"]).to_parquet(
        folder / "train.parquet", index=False)
    with pytest.raises(ValueError, match="labels"):
        loader.DetectionDataset(folder / "train.parquet")


@pytest.mark.parametrize("n, world", [(6, 1), (6, 2), (7, 2), (5, 4)])
def test_shards_cover_everything_with_equal_sizes_and_reshuffle(n, world):
    shards = []
    for rank in range(world):
        sampler = loader.ResumableSampler(n, rank=rank, world_size=world, seed=1)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    assert len({len(s) for s in shards}) == 1
    assert set().union(*shards) == set(range(n))
    # the same epoch gives the same order again; a new epoch reshuffles: another order of the
    # same shard sizes, still covering everything
    assert _shards(n, world, epoch=2) == shards
    other = _shards(n, world, epoch=3)
    assert [len(s) for s in other] == [len(s) for s in shards]
    assert set().union(*other) == set(range(n))
    assert other != shards and other[0] != shards[0]


def _shards(n: int, world: int, epoch: int) -> list[list[int]]:
    """Every rank's indices of ``epoch``."""
    out = []
    for rank in range(world):
        sampler = loader.ResumableSampler(n, rank=rank, world_size=world, seed=1)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_sampler_start_skips_consumed_indices():
    sampler = loader.ResumableSampler(10, rank=1, world_size=2, seed=0)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, start=3)
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3


def test_loader_batches_decode_in_workers(prepared):
    ds = loader.DetectionDataset(prepared / "train.parquet", hflip=0.5)
    sampler = loader.ResumableSampler(len(ds), rank=0, world_size=2)
    batches = list(loader.make_loader(ds, sampler, batch_size=2, num_workers=1))
    assert len(batches) == 2
    assert batches[0]["images"].shape == (2, 3, 64, 64)
    assert len(batches[0]["targets"]) == 2 and len(batches[0]["image_ids"]) == 2


@pytest.mark.parametrize("n, world", [(6, 1), (7, 2), (5, 4)])
def test_sampler_is_torchs_distributed_sampler_from_its_start(n, world):
    from torch.utils.data import DistributedSampler

    for rank in range(world):
        ours = loader.ResumableSampler(n, rank=rank, world_size=world, seed=3)
        theirs = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3)
        for epoch in (0, 4):
            ours.set_epoch(epoch, start=1)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)[1:] and len(ours) == len(theirs) - 1
        assert ours.shard_size == len(theirs)


def test_sampler_refuses_nothing_to_sample_and_a_bad_rank():
    from pipeline.errors import DataError

    with pytest.raises(DataError, match="num_items=0"):
        loader.ResumableSampler(0)
    with pytest.raises(ValueError, match=r"rank 2 not in \[0, 2\)"):
        loader.ResumableSampler(4, rank=2, world_size=2)


def test_images_are_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    """A split written by prepare's writer (row groups of ROW_GROUP_ROWS images, image bytes
    uncompressed): the dataset reads the small columns once and each image's row group only when
    it needs it, holding one at a time, and gives the same images as a whole read."""
    import pyarrow.parquet as pq

    from pipeline.prepare.writer import ROW_GROUP_ROWS, SplitWriter

    source = write_prepared(tmp_path / "src", size=32, num_images=2 * ROW_GROUP_ROWS + 3)
    rows = pq.read_table(source / "train.parquet").to_pylist()
    path = tmp_path / "train.parquet"
    writer = SplitWriter(path)
    for row in rows:
        writer.add(row)
    writer.close()
    table = pq.ParquetFile(path)
    assert table.num_row_groups == 3
    image = table.metadata.row_group(0).column(table.schema_arrow.names.index("image"))
    assert image.compression == "UNCOMPRESSED"

    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
    dataset = loader.DetectionDataset(path)
    assert reads == []                                        # nothing of the images yet
    images = [dataset[i][0] for i in range(len(dataset))]
    assert reads == [0, 1, 2]                                 # each row group once, in order
    assert dataset._cached[0] == 2 and len(dataset._cached[1]) == 3   # only the last held
    whole = loader.DetectionDataset(source / "train.parquet")          # one row group
    assert all(torch.equal(a, whole[i][0]) for i, a in enumerate(images))
    dataset[0]
    assert reads[-1] == 0                                     # back to the first: read again
