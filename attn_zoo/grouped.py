"""Attention in sorted order, for the content-based mechanisms (lsh, routing).

Tokens carry a group id (a hash bucket, a cluster). Sorting by (group,
position) brings each group together; tiles of ``chunk`` sorted tokens then
attend either

* ``"buckets"``: to the tokens *of their own group* in their own tile and the
  previous one (Reformer, Kitaev et al. 2020, Eq. 3-4: P_i = {j : h(q_i) =
  h(k_j)}, the chunks only bound the work),
* ``"chunks"``: to their own tile and the previous one, whatever the groups
  (trax's ``attend_across_buckets=True``, and most ports), or
* ``"window"``: to tokens of the *same group* at most ``chunk`` sorted places
  back, i.e. themselves and the ``chunk`` most recent earlier members of
  their group. This is causal in the strict sense: which keys a token sees
  depends on earlier tokens only, unlike chunk boundaries, which move when a
  later token lands in a smaller group.

A token's own key gets ``self_penalty`` added to its score (public Reformer
code: -1e5), so it is attended only when nothing else is visible. Given every
round's groups, a pair visible in N_ij rounds gets -log N_ij in each (Eq. 7,
duplicate correction), so that merging the rounds counts it once.
"""

from __future__ import annotations

import torch

from attn_zoo.flex import flex
from attn_zoo.kernels.sorting import sort_by_group
from attn_zoo.tiles import (
    SCORE_BYTES,
    attend_tiles,
    blocks,
    gather,
    key_mask,
    scatter,
    scatter_result,
    window,
)

MODES = ("buckets", "chunks", "window")


def sorted_tiles(n: int, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted places of each query tile [T, chunk] and of its keys, the tile
    and the one before it [T, 2 chunk]; -1 pads."""
    qp = blocks(n, chunk, device)
    kp = window(qp[:, 0] - chunk, 2 * chunk, n)
    return qp, kp


def sorted_attention(
    q,
    k,
    v,
    groups: torch.Tensor,
    chunk: int,
    mode: str,
    self_penalty: float,
    rounds: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) in original order for groups [B|1, H|1, N] (one round); with
    ``rounds`` [B|1, H|1, R, N], every round's groups, the duplicate correction;
    ``keep`` [B, N] hides padded keys."""  # fmt: skip
    n = q.shape[2]
    perm, _ = sort_by_group(groups)
    qp, kp = sorted_tiles(n, chunk, q.device)
    at = lambda places: torch.where(places >= 0, perm[..., places.clamp_min(0)], -1)
    qi, ki = at(qp), at(kp)  # original positions [B|1, H|1, T, chunk | 2 chunk]
    sorted_groups = groups.gather(-1, perm)

    def terms(part):  # visibility and bias of the query tiles ``part``
        qp_, kp_, qi_, ki_ = qp[part], kp[part], qi[..., part, :], ki[..., part, :]
        gq = sorted_groups[..., qp_.clamp_min(0)][..., :, None]
        gk = sorted_groups[..., kp_.clamp_min(0)][..., None, :]
        vis = (qi_[..., :, None] >= 0) & (ki_[..., None, :] >= 0)
        vis &= visible_sorted(qp_[:, :, None], kp_[:, None, :], gq, gk, chunk, mode)
        bias = (qi_[..., :, None] == ki_[..., None, :]).float() * self_penalty
        if rounds is not None:
            bias = bias - torch.log(rounds_visible(rounds, qi_, ki_, chunk, mode).clamp_min(1))
        return vis, bias

    # Eq. 7's count compares int64 sorted places per round: ~10 more bytes a score each
    per_score = SCORE_BYTES + (10 * rounds.shape[-2] if rounds is not None else 0)
    return attend_tiles(q, k, v, qi, ki, keep=keep, terms=terms, per_score=per_score)


def rounds_visible(rounds: torch.Tensor, qi, ki, chunk: int, mode: str) -> torch.Tensor:
    """N_ij: in how many rounds (groups [B|1, H|1, R, N]) key ki is visible to
    query qi (original positions [B|1, H|1, T, a] and [B|1, H|1, T, b])."""
    _, rank = sort_by_group(rounds)

    def at(x, index):  # x [.., R, N] at positions index [.., T, w] -> [.., R, T, w]
        flat = index.clamp_min(0).flatten(-2)[..., None, :].expand(*x.shape[:-1], -1)
        return x.gather(-1, flat).view(*x.shape[:-1], *index.shape[-2:])

    ri, rj = at(rank, qi)[..., :, None], at(rank, ki)[..., None, :]
    gi, gj = at(rounds, qi)[..., :, None], at(rounds, ki)[..., None, :]
    return visible_sorted(ri, rj, gi, gj, chunk, mode).sum(-4, dtype=torch.float32)


def sorted_flex(
    q,
    k,
    v,
    groups: torch.Tensor,
    chunk: int,
    mode: str,
    self_penalty: float | None,
    rounds: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sorted_attention` through FlexAttention: rows gathered into sorted
    order, the same rule as a mask_mod on sorted places, the self penalty and the
    duplicate correction as a score_mod; (out, lse) back in original order (lse
    None when not ``need_lse``)."""
    b, h, n, _ = q.shape
    perm, _ = sort_by_group(groups.expand(b, h, n))
    ordered = groups.expand(b, h, n).gather(-1, perm)
    if rounds is not None:
        rounds = rounds.expand(b, h, -1, n)
        _, ranks = sort_by_group(rounds)

    def visible(b, h, i, j):  # i, j are sorted places here
        return visible_sorted(i, j, ordered[b, h, i], ordered[b, h, j], chunk, mode)

    def duplicates(b, h, i, j):  # N_ij over the rounds, from original positions
        pi, pj = perm[b, h, i], perm[b, h, j]
        count = 0
        for r in range(rounds.shape[2]):
            ri, rj = ranks[b, h, r, pi], ranks[b, h, r, pj]
            seen = visible_sorted(ri, rj, rounds[b, h, r, pi], rounds[b, h, r, pj], chunk, mode)
            count = count + seen.float()
        return count

    def score_mod(score, b, h, i, j):
        if self_penalty:
            score = torch.where(i == j, score + self_penalty, score)
        if rounds is not None:
            score = score - torch.log(duplicates(b, h, i, j).clamp_min(1))
        return score

    modded = self_penalty or rounds is not None
    out, lse = flex(gather(q, perm), gather(k, perm), gather(v, perm), visible,
                    score_mod if modded else None, per_head=mode != "chunks",
                    keep=key_mask(keep, perm), need_lse=need_lse)  # fmt: skip
    if not need_lse:
        return scatter(out, perm, n), None
    return scatter_result((out, lse), perm, n)


def visible_sorted(rank_i, rank_j, group_i, group_j, chunk: int, mode: str) -> torch.Tensor:
    """The rule pair by pair from sorted places (the oracle's view, and the
    duplicate count's)."""
    if mode == "window":
        back = rank_i - rank_j
        return (group_i == group_j) & (back >= 0) & (back <= chunk)
    ci, cj = rank_i // chunk, rank_j // chunk
    near = (cj == ci) | (cj == ci - 1)
    return near if mode == "chunks" else near & (group_i == group_j)


def group_pairs(groups: torch.Tensor, chunk: int, mode: str) -> int:
    """Pairs :func:`sorted_attention` scores (self included), summed over leading dims."""
    n = groups.shape[-1]
    if mode == "buckets":  # the group's members within the sorted places [c - 1, c] chunks
        ordered = groups.sort(dim=-1).values.contiguous()
        first = torch.searchsorted(ordered, ordered, right=False)
        last = torch.searchsorted(ordered, ordered, right=True) - 1
        place = torch.arange(n, device=groups.device)
        lo = ((place // chunk - 1) * chunk).clamp_min(0)
        hi = ((place // chunk + 1) * chunk - 1).clamp_max(n - 1)
        return int((torch.minimum(last, hi) - torch.maximum(first, lo) + 1).sum())
    if mode == "chunks":
        sizes = torch.full((-(-n // chunk),), chunk)
        sizes[-1] = n - chunk * (len(sizes) - 1)
        prev = torch.cat([torch.zeros(1, dtype=sizes.dtype), sizes[:-1]])
        return int((sizes * (sizes + prev)).sum()) * groups[..., 0].numel()
    ordered = groups.sort(dim=-1).values
    first = torch.searchsorted(ordered.contiguous(), ordered.contiguous(), right=False)
    place = torch.arange(n, device=groups.device)
    return int(((place - first).clamp_max(chunk) + 1).sum())
