"""Memory: a clear error instead of an allocator trace or the kernel's OOM killer.

:func:`check_memory` refuses, before anything is allocated, a training step whose lower-bound
need (:func:`step_memory`) exceeds what the device has free (:func:`device_memory`);
:func:`out_of_memory_as_error` turns an allocator failure inside a step (CPU or CUDA) into the
same :class:`InsufficientMemoryError`, naming ``train.batch_size``, the step and the memory.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from pipeline.errors import InsufficientMemoryError

__all__ = ["InsufficientMemoryError", "check_memory", "device_memory", "out_of_memory_as_error",
           "step_memory"]


# Activations VGG-16's convolutional layers keep for the backward pass, per input pixel and
# image, in float32: the outputs of its 13 convolutions and 4 max-pools (64 * 2 + 16 +
# 128 * 2 / 4 + 8 + 256 * 3 / 16 + 4 + 512 * 3 / 64 + 2 + 512 * 3 / 256 = 300 values). A lower
# bound of what a step needs: the RPN, the RoI head, gradients and the weights come on top.
ACTIVATION_BYTES_PER_PIXEL = 300 * 4


def step_memory(images: int, image_size: int) -> dict[str, int]:
    """Lower bound, in bytes, of what one training step on ``images`` images needs."""
    pixels = images * image_size * image_size
    inputs = pixels * 3 * 4  # (B, 3, S, S) float32
    activations = pixels * ACTIVATION_BYTES_PER_PIXEL
    return {"inputs": inputs, "activations": activations, "total": inputs + activations}


def device_memory(device: torch.device) -> tuple[int, int, str]:
    """``(available bytes, total bytes, what)`` of ``device``: free GPU memory, else the
    host's available RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, total, f"GPU {device}"
    try:
        import psutil
        vm = psutil.virtual_memory()
        return vm.available, vm.total, "this node's RAM"
    except ImportError:  # psutil comes with ray[default]; a bare install reads sysconf
        page = os.sysconf("SC_PAGE_SIZE")
        return (os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page,
                "this node's RAM")


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def check_memory(*, batch_size: int, images_per_step: int, image_size: int,
                 device: torch.device, workers: int = 1) -> None:
    """Refuse, before allocating anything, a step that cannot fit in ``device``'s memory.

    Args:
        batch_size: ``train.batch_size`` (named in the message).
        images_per_step: the images a step really takes (at most the shard size).
        workers: processes sharing this memory (the workers of a local Ray on one node).
    Raises:
        InsufficientMemoryError: the lower bound of :func:`step_memory` exceeds the memory
            available.
    """
    need = step_memory(images_per_step, image_size)
    available, total, what = device_memory(device)
    if need["total"] * workers <= available:
        return
    per_step = (f"{images_per_step} image(s) of {image_size}x{image_size} per step"
                + (f" (the shard has {images_per_step})" if images_per_step < batch_size else ""))
    raise InsufficientMemoryError(
        f"train.batch_size={batch_size}: {per_step} need at least {_gib(need['total'])} per "
        f"worker ({_gib(need['inputs'])} of input, {_gib(need['activations'])} of backbone "
        f"activations)" + (f" x {workers} workers" if workers > 1 else "")
        + f", but {what} has {_gib(available)} available of {_gib(total)}; lower "
        f"train.batch_size (or data.image_size)")


# The CPU allocator's failures are plain RuntimeErrors, recognised by their text; CUDA's are
# torch.OutOfMemoryError, recognised by type.
_CPU_OOM_TEXT = re.compile(r"can't allocate|not enough memory|DefaultCPUAllocator",
                           re.IGNORECASE)
_OOM_BYTES = re.compile(r"allocate (\d+) bytes|[Tt]ried to allocate ([\d.]+ [KMGT]iB)")


@contextlib.contextmanager
def out_of_memory_as_error(*, batch_size: int, images: int, image_size: int,
                           device: torch.device, step: int):
    """Turn an allocator failure inside the block into :class:`InsufficientMemoryError`."""
    try:
        yield
    except InsufficientMemoryError:
        raise
    except (RuntimeError, MemoryError) as exc:
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) \
                and not _CPU_OOM_TEXT.search(str(exc)):
            raise
        found = _OOM_BYTES.search(str(exc))
        requested = ""
        if found:
            requested = (f"requested {_gib(int(found.group(1)))}, " if found.group(1)
                         else f"requested {found.group(2)}, ")
        available, total, what = device_memory(device)
        raise InsufficientMemoryError(
            f"train.batch_size={batch_size}: out of memory at step {step} with {images} "
            f"image(s) of {image_size}x{image_size} ({requested}{what}: {_gib(available)} "
            f"available of {_gib(total)}); lower train.batch_size (or data.image_size)"
        ) from None
