"""Comparing two runs' detections without depending on the order of near-tied scores.

Two runs of the same model that differ only in how the work is batched (or in which process
runs it) agree to ~1e-8 in their scores, not bit for bit: two detections whose scores nearly tie
may come out in either order. A test that compares them position by position then depends on the
machine; :func:`same_detections` compares them as sets, within tolerances.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch


def same_detections(a: Mapping[str, Any], b: Mapping[str, Any], *, box_tol: float = 1e-3,
                    score_tol: float = 1e-5) -> bool:
    """Whether ``a`` and ``b`` hold the same detections in any order.

    Args:
        a, b: ``{"boxes" (n, 4), "scores" (n,)}`` and optionally ``"labels" (n,)``, as tensors
            or (nested) lists.
        box_tol: largest difference of a box coordinate (pixels).
        score_tol: largest difference of a score.

    Each detection of ``a`` must have a counterpart in ``b`` (same label, box and score within the
    tolerances) and the other way round; the counts must be equal.
    """
    boxes = [torch.as_tensor(d["boxes"], dtype=torch.float64).reshape(-1, 4) for d in (a, b)]
    scores = [torch.as_tensor(d["scores"], dtype=torch.float64).reshape(-1) for d in (a, b)]
    if len(boxes[0]) != len(boxes[1]):
        return False
    close = ((boxes[0][:, None] - boxes[1][None]).abs().amax(dim=-1) <= box_tol) \
        & ((scores[0][:, None] - scores[1][None]).abs() <= score_tol)       # (n, n)
    if "labels" in a or "labels" in b:
        labels = [torch.as_tensor(d["labels"]).reshape(-1) for d in (a, b)]
        close &= labels[0][:, None] == labels[1][None]
    return bool(close.any(dim=1).all() and close.any(dim=0).all())
