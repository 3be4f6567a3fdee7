"""Resources: memory a step cannot have, and a tracking server that does not answer.

- Out of memory: an absurd ``train.batch_size`` fails before Ray starts (local Ray on CPU) with
  a message naming the batch size and the memory needed and available, and the stage's MLflow
  run ends FAILED with that message. An allocator failure inside a step (CPU
  ``DefaultCPUAllocator`` or CUDA ``OutOfMemoryError``) becomes the same kind of error, with
  the bytes requested. A batch larger than the shard is one smaller step, never zero steps.
- Unreachable tracking server (``tracking.uri: http://...`` closed port or no route): the stage
  fails within seconds, before any training and before Ray, naming the URI (credentials masked).
"""

from __future__ import annotations

import re
import socket
import time

import pytest
import torch
from torch import nn

from pipeline.cli import main
from pipeline.training import loop, memory
from tests.support import mlflow_store
from tests.support.factories import (RAY_PARAMS, tiny_cfg, write_params, write_prepared,
                                     write_ray_project)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_started() -> bool:
    import ray
    return ray.is_initialized()


def test_absurd_batch_size_fails_before_ray_and_marks_the_run_failed(tmp_path, monkeypatch,
                                                                      capsys):
    """Fault: train.batch_size=10^6 on 2000 images of 1024 x 1024 (1000 per worker per step:
    over a terabyte of activations). Survives: a clear error naming the batch size and the
    memory, the MLflow run FAILED with it, no Ray started, nothing written."""
    # a table that *says* it has 2000 images of 1024 x 1024 (the driver's memory check reads
    # only the table's metadata): the images themselves are empty
    write_prepared(tmp_path / "data" / "prepared", num_images=2000, num_eval=0, size=1024,
                   classes=["a"], content="blank")
    write_params(tmp_path / "params.yaml", {**RAY_PARAMS, "data.image_size": 1024,
                                            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    assert main(["train", "--stage", "rpn", "--set", "train.batch_size=1000000"]) == 1
    err = capsys.readouterr().err
    assert "train.batch_size=1000000" in err and "1000 image(s) of 1024x1024 per step" in err
    assert re.search(r"need at least [\d.]+ GiB per worker .* x 2 workers, but this node's RAM "
                     r"has [\d.]+ GiB available of [\d.]+ GiB", err), err
    assert "Traceback" not in err
    assert not _ray_started()
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()

    (run,) = mlflow_store.runs(tmp_path / "mlflow.db")
    assert run.info.run_name == "train_rpn" and run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("InsufficientMemoryError: train.batch_size=1000000")
    assert "GiB available of" in run.data.tags["error"]


class _Allocating(nn.Module):
    """A model whose forward asks the allocator for ``bytes_per_image`` per image."""

    def __init__(self, bytes_per_image: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.bytes_per_image = bytes_per_image

    def forward(self, images, targets):
        torch.empty(images.shape[0] * self.bytes_per_image, dtype=torch.uint8)
        return {"rpn_cls": self.w * images.mean(), "rpn_reg": self.w * 0}


class _Raising(nn.Module):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.error = error

    def forward(self, images, targets):
        raise self.error


def test_allocator_failure_in_a_step_names_batch_size_and_memory(prepared):
    """Fault: the allocator refuses a step's memory (a real 2^60-byte request on CPU, and the
    CUDA error text). Survives: InsufficientMemoryError naming train.batch_size, the step, the
    bytes requested and the device's available / total memory; not a 30-line allocator trace."""
    cfg = tiny_cfg(train__batch_size=2)
    with pytest.raises(memory.InsufficientMemoryError) as caught:
        loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet", num_classes=2,
                   model_fn=lambda: _Allocating(2**60))
    message = str(caught.value)
    assert message.startswith("train.batch_size=2: out of memory at step 1 with 2 image(s)")
    assert "requested 2147483648.00 GiB" in message
    assert re.search(r"this node's RAM: [\d.]+ GiB available of [\d.]+ GiB", message)

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                                  "total capacity of 79.19 GiB of which 1.00 GiB is free.")
    with pytest.raises(memory.InsufficientMemoryError, match="requested 20.00 GiB"):
        loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet", num_classes=2,
                   model_fn=lambda: _Raising(cuda))
    # other runtime errors are not memory errors: they pass through untouched
    with pytest.raises(RuntimeError, match="shape mismatch") as other:
        loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet", num_classes=2,
                   model_fn=lambda: _Raising(RuntimeError("shape mismatch")))
    assert not isinstance(other.value, MemoryError)


def test_the_worker_checks_its_memory_before_the_first_step(prepared, monkeypatch):
    """Fault: a worker whose device has 1 MiB free (a GPU shared with another job). Survives:
    the loop refuses before building the model, naming the batch size and both memories."""
    monkeypatch.setattr(memory, "device_memory",
                        lambda device: (2**20, 16 * 2**30, "GPU cuda:0"))
    built = []
    with pytest.raises(memory.InsufficientMemoryError) as caught:
        loop.train(tiny_cfg(train__batch_size=4), stage="rpn",
                   train_path=prepared / "train.parquet", num_classes=2,
                   model_fn=lambda: built.append(1) or _Allocating(0))
    assert str(caught.value).startswith("train.batch_size=4: 4 image(s) of 64x64 per step need")
    assert "GPU cuda:0 has 0.00 GiB available of 16.00 GiB" in str(caught.value)
    assert built == []


def test_batch_larger_than_the_shard_is_one_step_per_epoch(prepared):
    """Fault: train.batch_size (100) larger than the shard (6 images). Survives: each epoch is one
    step over the whole shard; training does not silently do zero steps."""
    result = loop.train(tiny_cfg(train__batch_size=100, train__rpn_epochs=2), stage="rpn",
                        train_path=prepared / "train.parquet", num_classes=2,
                        model_fn=lambda: _Allocating(0))
    assert result.steps == result.total_steps == 2
    assert result.images == 12 and [h["steps"] for h in result.history] == [1, 1]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "http://127.0.0.1:{port}/",
                                 "http://10.255.255.1:5000"])   # nothing answers there
def test_unreachable_tracking_server_fails_fast_naming_the_uri(tmp_path, monkeypatch, capsys,
                                                               uri):
    """Fault: tracking.uri names a server that does not answer. Survives: `frcnn train` stops
    before Ray and before any training, naming the URI (the account's password, in the
    environment, never shown). Fast: the health
    check waits at most 5 s (a dropped packet to 10.255.255.1 takes all of it); the 60 s bound
    only catches a hang, whatever the machine's load."""
    uri = uri.format(port=_closed_port())
    write_ray_project(tmp_path, {"tracking.uri": uri})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-secret")

    start = time.monotonic()
    assert main(["train", "--stage", "rpn"]) == 1
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    assert f"MLflow tracking server {uri} is unreachable" in err, err
    assert "hunter2" not in err and "Traceback" not in err
    assert not _ray_started()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "models").exists()
