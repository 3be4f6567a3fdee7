"""OpCounter: it counts dispatched operators and sees the ones that would stall a GPU."""

from __future__ import annotations

import torch
from torchvision.ops import nms

from benchmarks.op_count import OpCounter


def test_counts_operators_and_reads_back() -> None:
    x = torch.arange(6.0)
    with OpCounter() as c:
        y = x * 2 + 1
        total = float(y.sum())
    assert total == 36.0
    assert c.by_name["aten::mul"] == 1 and c.by_name["aten::add"] == 1
    assert c.syncs == 1 and c.sync_names == {"aten::_local_scalar_dense": 1}
    assert c.total == sum(c.by_name.values()) >= 4


def test_data_dependent_sizes_are_syncs_fixed_sizes_are_not() -> None:
    x = torch.tensor([3.0, -1.0, 2.0, 0.5])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    with OpCounter() as fixed:
        x.topk(2)
        x[torch.tensor([0, 2])]
        x.masked_fill(x < 0, 0.0)
        torch.where(x > 1, x, 0.0)
    assert fixed.syncs == 0
    with OpCounter() as dynamic:
        x[x > 1]  # boolean mask: a hidden nonzero
        torch.nonzero(x)
        x.unique()
        nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert dynamic.syncs == 4
    assert dynamic.sync_names["aten::index"] == 1 and dynamic.sync_names["torchvision::nms"] == 1
