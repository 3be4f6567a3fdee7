"""What runs on a Ray Train worker: its context and the training loop with Ray's hooks.

Shared by the training stages (:mod:`pipeline.training.driver`) and the sweep's trials
(:mod:`pipeline.sweep.trial`): :func:`worker_context` reads the worker's config, rank, world
size and device; :func:`fit_on_worker` runs :func:`pipeline.training.loop.train` with the model
wrapped for DDP (``ray.train.torch.prepare_model``), checkpoints reported through
``ray.train.report``, and a restarted or restored run resumed from Ray's checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Config


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """Where a Ray Train worker runs: its config, rank, world size and device."""

    cfg: Config
    rank: int
    world_size: int
    device: Any
    local_rank: int = 0
    node_rank: int = 0

    @property
    def node(self) -> str:
        """This worker's node as system metrics name it: ``node<node rank>``."""
        return f"node{self.node_rank}"


def worker_context(config: dict[str, Any]) -> WorkerContext:
    """On a Ray Train worker: the config of ``config["params"]``, rank, world size and device;
    a CPU worker uses ``config["threads"]`` threads."""
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.config import from_dict

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config["threads"])
    return WorkerContext(from_dict(config["params"]), ctx.get_world_rank(),
                         ctx.get_world_size(), device, local_rank=ctx.get_local_rank(),
                         node_rank=ctx.get_node_rank())


def fit_on_worker(worker: WorkerContext, **loop_args: Any) -> Any:
    """:func:`pipeline.training.loop.train` on this Ray Train worker with Ray's hooks: the model
    wrapped for DDP, checkpoints reported through ``ray.train.report`` (uploaded to the run's
    storage asynchronously: the next step does not wait for the upload), and a restarted or
    restored run resumed from Ray's checkpoint. ``loop_args``: the loop's other arguments."""
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.training import loop

    def report(metrics: dict[str, float], folder: Path | None, name: str) -> None:
        if folder is None:
            ray.train.report(metrics, checkpoint_dir_name=name)
            return
        # Ray uploads the folder in the background and deletes it when done
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        # device_ids=None: DDP leaves the inputs where they are (as on the CPU). The loop moves
        # the images; the targets stay on the CPU for the model to check and pad without a
        # host sync (DDP would otherwise copy every target tensor to the GPU first).
        return ray.train.torch.prepare_model(
            model, move_to_device=worker.device,
            parallel_strategy_kwargs={"device_ids": None, "output_device": None})

    resume = ray.train.get_checkpoint()
    with (resume.as_directory() if resume is not None else contextlib.nullcontext()) as folder:
        return loop.train(worker.cfg, resume=folder, rank=worker.rank,
                                world_size=worker.world_size, device=worker.device,
                                wrap_model=wrap, report=report, say=say, **loop_args)


def say(message: str) -> None:
    """A progress line from a worker, shown once on the driver."""
    # Ray Train V2 routes print() through its logger, which shows each line twice on the
    # driver; the worker's stdout itself is forwarded once.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
