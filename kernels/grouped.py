"""Content-based attention on the flash core, in sorted order (Reformer LSH,
Kitaev et al. 2020; Routing Transformer, Roy et al. 2020).

Rows are read through the permutation that sorts tokens by (group, position);
the output goes back to each token's position. The modes of
:mod:`attn_zoo.grouped`:

* ``"buckets"``: chunk c of ``chunk`` sorted places sees chunks c - 1 and c
  (a segment window on sorted places), only its own group there (group
  equality);
* ``"chunks"``: the same window, whatever the groups;
* ``"window"``: a token sees its own group's members at most ``chunk`` sorted
  places back (a band plus group equality).

Given every round's groups, round r's part hides the pairs an earlier round
shows, so each pair of the rounds' union counts once (Reformer, Eq. 7:
:class:`~attn_zoo.kernels.flash.Duplicates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attn_zoo.kernels.autograd import attend
from attn_zoo.kernels.flash import Duplicates, Part
from attn_zoo.kernels.layout import Band, Window, build_layout, cached_layout
from attn_zoo.kernels.sorting import sort_by_group
from attn_zoo.kernels.tuning import tile_for


@dataclass(frozen=True)
class SortedRounds:
    """Every round's tokens sorted by (group, position), one row per round, batch and
    head ([R * B * H, N]): ``groups`` in positions' order, ``perm[p]`` the position at
    sorted place p, ``rank[i]`` the sorted place of position i."""

    groups: torch.Tensor
    perm: torch.Tensor
    rank: torch.Tensor

    @classmethod
    def of(cls, groups: torch.Tensor, b: int, h: int) -> SortedRounds:
        """For groups [B|1, H|1, R, N]: one sort of every round."""
        rounds, n = groups.shape[-2:]
        rows = groups.expand(b, h, rounds, n).transpose(1, 2).transpose(0, 1)  # [R, B, H, N]
        rows = rows.reshape(rounds * b * h, n)
        return cls(rows, *sort_by_group(rows))

    def places(self, b: int, h: int) -> torch.Tensor:
        """``rank`` as [B, H, R, N] (a view)."""
        return self.rank.view(-1, b, h, self.rank.shape[-1]).permute(1, 2, 0, 3)


def round_codes(rounds: torch.Tensor, b: int, h: int, chunk: int, mode: str,
                groups: int | None = None,
                place: torch.Tensor | None = None) -> Duplicates:  # fmt: skip
    """Every round's visibility rule for Eq. 7 as one integer per position, from the
    groups [B|1, H|1, R, N] and the places p they sort to: key j is visible to query
    i in a round exactly when 0 <= code_i - code_j <= reach.

    * ``"chunks"``: code = p // chunk, reach 1 (chunks c - 1 and c);
    * ``"buckets"``: code = group (C + 1) + p // chunk for C chunks, reach 1: within
      a group it is the chunk rule, across groups the difference is at least 2 or
      below 0;
    * ``"window"``: code = group (N + chunk + 1) + p, reach ``chunk`` (0 to chunk
      places back), the same argument.

    ``groups``: how many groups there are (ids 0 to groups - 1), so that the int32
    check reads nothing back from the device (None: the largest id is read).
    ``place``: the places [B, H, R, N] when the caller has sorted the rounds already
    (:meth:`SortedRounds.places`), else they are sorted here.
    """
    rounds = rounds.expand(b, h, -1, -1).long()
    if place is None:
        _, place = sort_by_group(rounds)
    n = rounds.shape[-1]
    chunks = -(-n // chunk)
    if mode == "window":
        codes, reach, span = rounds * (n + chunk + 1) + place, chunk, n + chunk + 1
    else:
        codes, reach = torch.div(place, chunk, rounding_mode="floor"), 1
        span = chunks + 1 if mode == "buckets" else 0
        if mode == "buckets":
            codes = codes + rounds * span
    groups = groups if groups is not None else int(rounds.max()) + 1 if rounds.numel() else 0
    within = n if mode == "window" else chunks  # a group's codes: group * span + [0, within)
    if (groups - 1) * span + within > 2**31:
        raise ValueError(f"lsh: {groups} buckets at N = {n} overflow the kernel's int32 "
                         "round codes; use fewer buckets")  # fmt: skip
    return Duplicates(codes.reshape(b * h, *codes.shape[2:]).to(torch.int32).contiguous(), reach)


def sorted_parts(q, k, v, groups, chunk: int, mode: str, self_bias,
                 duplicates: Duplicates | None = None, keep=None,
                 prune: bool = True, order: SortedRounds | None = None) -> list[Part]:  # fmt: skip
    """One part per round for groups [B|1, H|1, R, N], output in original order,
    built together: one sort of every round's tokens and, for the modes with group
    equality, one layout of every round's rows, split per round (a handful of
    launches in all, not a layout's worth per round). With ``duplicates``
    (:func:`round_codes` of every round), round r's part hides what rounds 0..r-1
    show (Eq. 7).

    ``prune=False``: no layout of the groups; the kernel tests them in every block of
    the positions' cached layout, which lists none as full. That visits the blocks
    whose groups meet nowhere and walks masked the rare blocks of one group, but
    builds nothing per call: worth it where groups are narrower than a block (lsh's
    buckets hold chunk / 2 tokens on average, and its layout of groups spares 1.6% of
    its scores at N = 8,192), not where they are wider (routing's clusters of about
    sqrt(N) spare 25%). ``order``: the rounds already sorted (:class:`SortedRounds`
    of ``groups``), else sorted here."""
    b, h, n, _ = q.shape
    rounds = groups.shape[-2]
    tile = tile_for(q, "duplicates" if duplicates is not None else "plain")
    if order is None:
        order = SortedRounds.of(groups, b, h)
    groups, perm = order.groups, order.perm
    # chunks c - 1 and c of sorted places (a segment window), or a sorted-place band
    window = None if mode == "window" else Window(chunk, chunk, lo=-chunk, hi=chunk - 1)
    band = Band(lo=0, hi=chunk) if mode == "window" else Band()
    by_group = mode != "chunks"  # "chunks": whatever the groups, a layout of positions only
    per_round = by_group and prune
    if by_group:
        ordered = groups.gather(-1, perm).to(torch.int32).contiguous()

    def layout_of(self_pairs: bool):
        if per_round:
            return build_layout(n, n, band, window, q_groups=ordered, k_groups=ordered,
                                self_pairs=self_pairs, block_m=tile.block_m,
                                block_n=tile.block_n, device=q.device)  # fmt: skip
        return cached_layout(n, n, band, window, tile.blocks, q.device, self_pairs=self_pairs,
                             partial_only=by_group)  # fmt: skip

    # Reformer's self penalty in round 0 only when Eq. 7 holds: every round shows the
    # pair i == j (code_i - code_i = 0), so a later round hides it as seen before
    biases = [self_bias if r == 0 or duplicates is None else None for r in range(rounds)]
    layouts = {pairs: layout_of(pairs) for pairs in {bias is not None for bias in biases}}
    perm = perm.to(torch.int32).contiguous()
    parts = []
    for r, bias in enumerate(biases):
        rows = slice(r * b * h, (r + 1) * b * h)
        layout = layouts[bias is not None]
        index = perm[rows]  # one tensor for q and k: the same order
        grouped = dict(groups=(ordered[rows],) * 2) if by_group else {}
        dup = duplicates.for_round(r) if duplicates is not None else None
        parts.append(Part(k, v, layout.rows(rows) if per_round else layout, band, window,
                          q_index=index, k_index=index, self_bias=bias, duplicates=dup,
                          keep=keep, tile=tile, **grouped))  # fmt: skip
    return parts


def clustered_flash(q, k, v, members: torch.Tensor, keep=None) -> torch.Tensor:
    """Each cluster attends within itself: members [B, H, C, w] positions.
    Returns [B, H, C * w, D] in member order (a token may sit in several clusters)."""
    b, h, clusters, width = members.shape
    index = members.reshape(b * h, clusters * width).to(torch.int32).contiguous()
    window = Window(seg_len=width, step=width, lo=0, hi=width - 1)
    n = index.shape[1]
    tile = tile_for(q)
    layout = cached_layout(n, n, Band(), window, tile.blocks, q.device)
    part = Part(k, v, layout, Band(), window, q_index=index, k_index=index, scatter=False,
                keep=keep, tile=tile)  # fmt: skip
    return attend(q, [part])[0]
