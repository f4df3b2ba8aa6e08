"""Attention in sorted order, for the content-based mechanisms (lsh, routing).

Tokens carry a group id (a hash bucket, a cluster). Sorting by (group,
position) brings each group together; tiles of ``chunk`` sorted tokens then
attend either

* ``"chunks"``: to their own tile and the previous one, whatever the groups
  (Reformer's chunked attention, Kitaev et al. 2020, Sec. 2.2), or
* ``"window"``: to tokens of the *same group* at most ``chunk`` sorted places
  back, i.e. themselves and the ``chunk`` most recent earlier members of
  their group. This is causal in the strict sense: which keys a token sees
  depends on earlier tokens only, unlike chunk boundaries, which move when a
  later token lands in a smaller group.

A token's own key gets ``self_penalty`` added to its score (public Reformer
code: -1e5), so it is attended only when nothing else is visible.
"""

from __future__ import annotations

import torch

from attn_zoo.flex import flex
from attn_zoo.tiles import attend, blocks, gather, scatter_result, window

MODES = ("chunks", "window")


def sort_by_group(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, rank) for groups [..., N]: ``perm[p]`` is the position at sorted
    place p, ``rank[i]`` the sorted place of position i."""
    n = groups.shape[-1]
    pos = torch.arange(n, device=groups.device)
    perm = torch.argsort(groups * n + pos, dim=-1)
    rank = torch.empty_like(perm).scatter_(-1, perm, pos.expand_as(perm))
    return perm, rank


def sorted_tiles(n: int, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted places of each query tile [T, chunk] and of its keys, the tile
    and the one before it [T, 2 chunk]; -1 pads."""
    qp = blocks(n, chunk, device)
    kp = window(qp[:, 0] - chunk, 2 * chunk, n)
    return qp, kp


def sorted_attention(
    q, k, v, groups: torch.Tensor, chunk: int, mode: str, self_penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) in original order for groups [B|1, H|1, N] (one round)."""
    n = q.shape[2]
    perm, _ = sort_by_group(groups)
    qp, kp = sorted_tiles(n, chunk, q.device)
    at = lambda places: torch.where(places >= 0, perm[..., places.clamp_min(0)], -1)
    qi, ki = at(qp), at(kp)  # original positions [B|1, H|1, T, chunk | 2 chunk]
    vis = (qi[..., :, None] >= 0) & (ki[..., None, :] >= 0)
    if mode == "window":
        sorted_groups = groups.gather(-1, perm)
        gq = sorted_groups[..., qp.clamp_min(0)][..., :, None]
        gk = sorted_groups[..., kp.clamp_min(0)][..., None, :]
        back = qp[:, :, None] - kp[:, None, :]
        vis &= (gq == gk) & (back >= 0) & (back <= chunk)
    is_self = qi[..., :, None] == ki[..., None, :]
    bias = is_self.float() * self_penalty
    result = attend(gather(q, qi), gather(k, ki), gather(v, ki), vis, bias=bias)
    return scatter_result(result, qi, n)


def sorted_flex(
    q, k, v, groups: torch.Tensor, chunk: int, mode: str, self_penalty: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sorted_attention` through FlexAttention: rows gathered into sorted
    order, the same rule as a mask_mod on sorted places, the self penalty as a
    score_mod; (out, lse) back in original order."""
    b, h, n, _ = q.shape
    perm, _ = sort_by_group(groups.expand(b, h, n))
    ordered = groups.expand(b, h, n).gather(-1, perm)

    def chunks(b, h, i, j):
        return (j // chunk == i // chunk) | (j // chunk == i // chunk - 1)

    def same_group_window(b, h, i, j):
        return (ordered[b, h, i] == ordered[b, h, j]) & (i - j >= 0) & (i - j <= chunk)

    def self_score(score, b, h, i, j):
        return torch.where(i == j, score + self_penalty, score)

    mask, per_head = (chunks, False) if mode == "chunks" else (same_group_window, True)
    penalty = self_score if self_penalty else None
    result = flex(gather(q, perm), gather(k, perm), gather(v, perm), mask, penalty,
                  per_head=per_head)  # fmt: skip
    return scatter_result(result, perm, n)


def visible_sorted(rank_i, rank_j, group_i, group_j, chunk: int, mode: str) -> torch.Tensor:
    """The oracle's view of the same rule, from sorted places pair by pair."""
    if mode == "chunks":
        ci, cj = rank_i // chunk, rank_j // chunk
        return (cj == ci) | (cj == ci - 1)
    back = rank_i - rank_j
    return (group_i == group_j) & (back >= 0) & (back <= chunk)


def group_pairs(groups: torch.Tensor, chunk: int, mode: str) -> int:
    """Pairs :func:`sorted_attention` scores (self included), summed over leading dims."""
    n = groups.shape[-1]
    if mode == "chunks":
        sizes = torch.full((-(-n // chunk),), chunk)
        sizes[-1] = n - chunk * (len(sizes) - 1)
        prev = torch.cat([torch.zeros(1, dtype=sizes.dtype), sizes[:-1]])
        return int((sizes * (sizes + prev)).sum()) * groups[..., 0].numel()
    ordered = groups.sort(dim=-1).values
    first = torch.searchsorted(ordered.contiguous(), ordered.contiguous(), right=False)
    place = torch.arange(n, device=groups.device)
    return int(((place - first).clamp_max(chunk) + 1).sum())
