"""Sorting tokens by group (hash bucket, cluster), shared by the references and
the kernels of the content-based mechanisms. Plain torch: importing it does not
import triton."""

from __future__ import annotations

import torch


def sort_by_group(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, rank) for groups [..., N] sorted by (group, position): ``perm[p]`` is
    the position at sorted place p, ``rank[i]`` the sorted place of position i."""
    n = groups.shape[-1]
    pos = torch.arange(n, device=groups.device)
    perm = torch.argsort(groups * n + pos, dim=-1)
    rank = torch.empty_like(perm).scatter_(-1, perm, pos.expand_as(perm))
    return perm, rank
