"""Count the tensor operations a piece of code dispatches, and those that stall a GPU.

On a GPU in eager mode every operator is at least one kernel launch, a few microseconds of CPU
time each, and the CPU runs ahead of the GPU only as long as it never needs a value the GPU
computes. An operator whose output *size* depends on the data (``nonzero``; boolean-mask
indexing ``x[mask]``, which calls it; ``unique``; ``masked_select``; NMS), or that reads a value back
(``.item()``, ``bool(t)``, ``float(t)``: ``_local_scalar_dense``; a device-to-host copy), makes
the CPU wait until the GPU has finished everything queued before it: a host sync, after which
the GPU idles while the CPU queues the next kernels.

Both counts are properties of the code, not of the device, so they can be taken on a CPU: on
the CPU the data-dependent operators are counted as the syncs they would be on a GPU (reading a
CPU tensor with ``.tolist()`` dispatches nothing and is not seen). Used by
``benchmarks/bench_detector.py`` and the tests of the detector's batching.

Example::

    with OpCounter() as counts:
        losses = model(images, targets)
    print(counts.total, counts.syncs, counts.by_name.most_common(5))
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
# A private module of torch (no public dispatch-mode base class yet), stable across 2.x; torch
# is pinned in pyproject.toml, so a change shows up as a failing tests/benchmarks/test_op_count.py.
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DATA_DEPENDENT_OPS", "OpCounter"]

#: Operators whose output size or value the host must wait for.
DATA_DEPENDENT_OPS = frozenset({
    "aten::_local_scalar_dense",  # .item(), bool(t), int(t), float(t)
    "aten::nonzero",  # also boolean-mask indexing, torch.where(mask)
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",  # the Tensor-repeats overload
    "torchvision::nms",
})


def _bool_mask_index(name: str, args: tuple[Any, ...]) -> bool:
    """``x[mask]`` / ``x[mask] = y`` with a boolean mask: a hidden ``nonzero`` (the kernel calls it
    itself, below this counter)."""
    if name not in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())


def _device_to_host(name: str, args: tuple[Any, ...], out: Any) -> bool:
    """A copy from a GPU tensor into host memory (``.cpu()``, ``.tolist()`` on the GPU)."""
    if name == "aten::_to_copy" and isinstance(out, torch.Tensor):
        return out.device.type == "cpu" and args[0].device.type != "cpu"
    if name == "aten::copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class OpCounter(TorchDispatchMode):
    """Counts every ATen / torchvision operator dispatched while active (see the module doc).

    Attributes:
        by_name: ``Counter`` of operator names (``"aten::add"``).
        syncs: data-dependent operators, boolean-mask indexing and device-to-host copies.
        sync_names: ``Counter`` of the operator names behind ``syncs``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()
        self.syncs = 0
        self.sync_names: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """All operators dispatched."""
        return sum(self.by_name.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        self.by_name[name] += 1
        if (name in DATA_DEPENDENT_OPS or _bool_mask_index(name, args)
                or _device_to_host(name, args, out)):
            self.syncs += 1
            self.sync_names[name] += 1
        return out
