"""Random, balanced subsampling of labelled candidates (anchors for the RPN, RoIs for the head).

Shapes: ``B`` images, ``N`` candidates per image. Labels: ``1`` positive, ``0`` negative, ``-1``
ignored.

Every image keeps at most ``int(num_samples * pos_fraction)`` positives, a uniformly random
subset when it has more, and fills the rest up to ``num_samples`` with a uniformly random subset
of its negatives (so an image with few positives takes more negatives). The whole batch is done
at once: each candidate draws a random key, and the ``k`` largest keys among the positives
(negatives) of a row are kept, ``k`` varying per row, with one ``topk`` per label and no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_keys", "sample_labels"]


def random_keys(shape: tuple[int, ...], device: torch.device,
                generator: torch.Generator | None = None) -> Tensor:
    """Uniform ``[0, 1)`` float32 keys of ``shape`` on ``device``, drawn from ``generator``
    (on the generator's own device) when one is given, else from the global RNG."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _top_random(mask: Tensor, keys: Tensor, quota: Tensor, k: int) -> Tensor:
    """Per row, the ``quota[b]`` members of ``mask[b]`` with the largest keys (all when fewer).

    Args:
        mask: ``(B, N)`` bool candidates.
        keys: ``(B, N)`` float32 random keys in ``[0, 1)``.
        quota: ``(B,)`` int64 how many to keep per row; at most ``k``.
        k: static upper bound of ``quota``.

    Returns:
        ``(B, N)`` bool, the kept candidates.
    """
    k = min(k, mask.shape[1])
    chosen = torch.zeros_like(mask)
    if k <= 0:
        return chosen
    # Non-members get key -1 and so rank after every member.
    values, index = torch.where(mask, keys, -1.0).topk(k, dim=1)  # (B, k), largest keys first
    rank = torch.arange(k, device=mask.device)
    keep = (values >= 0) & (rank[None, :] < quota[:, None])  # (B, k)
    return chosen.scatter_(1, index, keep)


def sample_labels(labels: Tensor, num_samples: int, pos_fraction: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Keep a balanced random sample of the labelled candidates; the rest become ``-1``.

    Args:
        labels: ``(B, N)`` int64 in ``{-1, 0, 1}``.
        num_samples: candidates kept per image (at most; fewer when there are not enough).
        pos_fraction: at most ``int(num_samples * pos_fraction)`` of them positive.
        generator: random source for the subsets (default: the global RNG).

    Returns:
        ``(B, N)`` int64 in ``{-1, 0, 1}``: per row, ``min(#pos, max_pos)`` ones and
        ``min(#neg, num_samples - #kept ones)`` zeros, the others ``-1``.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, N), got shape {tuple(labels.shape)}")
    max_pos = int(num_samples * pos_fraction)
    keys = random_keys(tuple(labels.shape), labels.device, generator)
    pos = labels == 1
    neg = labels == 0
    full = torch.full((labels.shape[0],), max_pos, dtype=torch.int64, device=labels.device)
    keep_pos = _top_random(pos, keys, full, max_pos)
    neg_quota = num_samples - keep_pos.sum(dim=1)  # (B,)
    keep_neg = _top_random(neg, keys, neg_quota, num_samples)
    # masked_fill, not out[mask] = v: boolean indexing would sync with the host.
    return torch.full_like(labels, -1).masked_fill(keep_neg, 0).masked_fill(keep_pos, 1)
