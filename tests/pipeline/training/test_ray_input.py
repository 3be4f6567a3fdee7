"""pipeline.training.ray_input: the training input through Ray Data, its coverage and its order.

Without Ray: :class:`ShardInput` over a scripted shard (batches, skipping, decoding, flips).
With Ray, for real: a ``TorchTrainer`` of two workers over :func:`epoch_datasets` of a 7-image
table in three part files (three read tasks): every image once per epoch (one padded), the
same rows to the same rank in the same order on every execution, and a resumed epoch
continuing exactly where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.prepared_table import MODEL_COLUMNS
from pipeline.training import loader
from pipeline.training.ray_input import ShardInput, data_config, epoch_datasets, epoch_order
from tests.support.factories import write_prepared


class ScriptedShard:
    """A ``DataIterator`` stand-in: a table's rows in order, in batches of Arrow tables."""

    def __init__(self, path: Path) -> None:
        self.table = pq.read_table(path, columns=list(MODEL_COLUMNS))
        self.names: list[str] = []

    def __call__(self, name: str) -> "ScriptedShard":
        self.names.append(name)
        return self

    def iter_batches(self, *, batch_size: int, batch_format: str, prefetch_batches: int,
                     **shuffle):
        assert batch_format == "pyarrow" and not shuffle
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def test_shard_input_decodes_flips_and_skips_like_the_plain_reader(tmp_path):
    folder = write_prepared(tmp_path / "p", num_images=5)
    path = folder / "train.parquet"
    shard = ScriptedShard(path)
    data = ShardInput(rows=5, world_size=1, rank=0, image_size=64, batch_size=2, seed=3,
                      hflip=0.5, use_difficult=False, shuffle_buffer=0, threads=2, shard=shard)
    plain = loader.DetectionDataset(path, hflip=0.5, seed=3)
    plain.set_epoch(1)
    batches = list(data.epoch(1))
    assert shard.names == ["train_e1"] and data.shard_size == 5
    assert [b["image_ids"] for b in batches] == [["train_000", "train_001"],
                                                 ["train_002", "train_003"], ["train_004"]]
    for b, batch in enumerate(batches):
        for j, image_id in enumerate(batch["image_ids"]):
            image, target, _ = plain[2 * b + j]        # the same flip for the same image
            assert torch.equal(batch["images"][j], image)
            assert torch.equal(batch["targets"][j]["boxes"], target["boxes"])
    resumed = list(data.epoch(1, start_step=2))
    assert [b["image_ids"] for b in resumed] == [["train_004"]]


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    files = [f"part-{i}" for i in range(8)]
    assert epoch_order(files, 0, 0) == epoch_order(files, 0, 0)
    assert sorted(epoch_order(files, 0, 1)) == files
    assert len({tuple(epoch_order(files, 0, e)) for e in range(4)}) == 4


@pytest.mark.slow
def test_every_image_once_per_epoch_in_the_same_order_on_every_run(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_session import ray_session

    def record(config: dict) -> None:
        """On each worker: the image ids it is dealt, epoch 0 twice (the second time resumed
        after one step), then epoch 1; written to ``<out>/rank<r>.json``."""
        import ray.train

        ctx = ray.train.get_context()
        data = ShardInput(rows=config["rows"], world_size=ctx.get_world_size(),
                          rank=ctx.get_world_rank(), image_size=64, batch_size=2, seed=0,
                          hflip=0.5, use_difficult=False, shuffle_buffer=4, threads=1)
        seen = {"e0": [b["image_ids"] for b in data.epoch(0)],
                "e0_from_step_1": [b["image_ids"] for b in data.epoch(0, start_step=1)],
                "e1": [b["image_ids"] for b in data.epoch(1)]}
        Path(config["out"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps(seen))

    from pipeline.prepare.writer import SplitWriter
    from pipeline.prepared_table import table_files

    folder = write_prepared(tmp_path / "p", num_images=7)
    path = tmp_path / "parts" / "train.parquet"      # a folder of 3 files: 3 + 3 + 1 rows
    path.parent.mkdir()
    writer = SplitWriter(path, rows_per_file=3, rows_per_group=1)
    for row in pq.read_table(folder / "train.parquet").to_pylist():
        writer.add(row)
    writer.close()
    files = [str(f) for f in table_files(path)]
    rows = 7
    assert len(files) == 3
    out = tmp_path / "seen"
    out.mkdir()
    with ray_session(None):
        TorchTrainer(record, train_loop_config={"rows": rows, "out": str(out)},
                     datasets=epoch_datasets(files, rows=rows, epochs=2, seed=0,
                                             world_size=2),
                     dataset_config=data_config(),
                     scaling_config=ScalingConfig(num_workers=2,
                                                  resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(storage_path=str(tmp_path / "runs"))).fit()
        # fewer rows than workers: the pad repeats the table as often as it takes
        one = tmp_path / "one.parquet"
        pq.write_table(pq.read_table(folder / "train.parquet").slice(0, 1), one)
        padded = epoch_datasets([str(one)], rows=1, epochs=1, seed=0, world_size=4)
        assert padded["train_e0"].count() == 4
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    ids = [f"train_{i:03d}" for i in range(7)]
    for epoch in ("e0", "e1"):
        dealt = [[i for batch in rank[epoch] for i in batch] for rank in ranks]
        assert [len(d) for d in dealt] == [4, 4]             # ceil(7 / 2) each: equal steps
        assert sorted(set(dealt[0] + dealt[1])) == ids       # every image...
        assert len(dealt[0] + dealt[1]) == 8                 # ...once, one of them padded
        assert all(len(rank[epoch]) == 2 for rank in ranks)  # 2 steps of batch 2
    for rank in ranks:
        # the second execution of epoch 0 deals the same rows to the same rank in the same
        # order: resumed after one step, it continues exactly
        assert rank["e0_from_step_1"] == rank["e0"][1:]
        assert rank["e1"] != rank["e0"]                      # another shuffle each epoch
