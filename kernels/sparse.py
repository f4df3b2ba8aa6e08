"""Sparse Transformer patterns on the flash core (Child et al. 2019, Sec. 4.2).

The merged head A1 ∪ A2 is two launches over disjoint key sets, the second
accumulating into the first's (out, lse):

strided: the band 0 < |i - j| < l in natural order, then every position with
    the same residue i mod l (self included), in column-major order where each
    residue is one contiguous column;
fixed: the query's own block (a segment window), then the summary positions
    (j mod l >= l - c) of the other blocks, gathered into a list of their own.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from attn_zoo.kernels.autograd import attend
from attn_zoo.kernels.flash import Part
from attn_zoo.kernels.layout import BIG, Band, Window, build_layout, cached_layout
from attn_zoo.kernels.tuning import tile_for


@lru_cache(maxsize=16)
def _columns(n: int, stride: int, causal: bool, blocks: tuple[int, int], device):
    """Column-major order of the [N / l, l] grid: (order, column of each place, layout)."""
    pos = torch.arange(n, device=device)
    order = torch.argsort((pos % stride) * n + pos)
    column = (order % stride).to(torch.int32)[None]
    band = Band(lo=0) if causal else Band()
    layout = build_layout(n, n, band, q_groups=column, k_groups=column, block_m=blocks[0],
                          block_n=blocks[1], device=device)  # fmt: skip
    return order.to(torch.int32)[None].contiguous(), column.contiguous(), layout


def strided_attention(q, k, v, plan) -> torch.Tensor:
    n, l, tile = plan.n_q, plan.stride, tile_for(q)
    near = Band(lo=1, hi=l - 1) if plan.causal else Band(lo=-(l - 1), hi=l - 1)
    layout = cached_layout(n, n, near, None, tile.blocks, q.device, self_pairs=not plan.causal)
    self_bias = None if plan.causal else float("-inf")  # i == j is in the column part
    order, column, columns = _columns(n, l, plan.causal, tile.blocks, q.device)
    far = Band(lo=0) if plan.causal else Band()
    parts = [
        Part(k, v, layout, near, self_bias=self_bias, keep=plan.keep, tile=tile),
        Part(k, v, columns, far, q_index=order, k_index=order, groups=(column, column),
             keep=plan.keep, tile=tile),
    ]  # fmt: skip
    return attend(q, parts)[0]


@lru_cache(maxsize=16)
def _summary(n: int, stride: int, summary: int, device) -> torch.Tensor:
    """Positions j with j mod l >= l - c, in order: summary s belongs to block s // c."""
    pos = torch.arange(n, device=device)
    return pos[pos % stride >= stride - summary].to(torch.int32)[None].contiguous()


def fixed_attention(q, k, v, plan) -> torch.Tensor:
    n, l, c = plan.n_q, plan.stride, plan.summary
    tile = tile_for(q)
    band = Band(lo=0) if plan.causal else Band()
    own = Window(seg_len=l, step=l, lo=0, hi=l - 1)
    own_layout = cached_layout(n, n, band, own, tile.blocks, q.device)
    parts = [Part(k, v, own_layout, band, own, keep=plan.keep, tile=tile)]
    if c > 0 and n > l - c:
        index = _summary(n, l, c, q.device)
        # summaries of earlier blocks: s < (i // l) c; bidirectional adds the later ones
        windows = [Window(seg_len=l, step=c, lo=-BIG, hi=-1)]
        if not plan.causal:
            windows.append(Window(seg_len=l, step=c, lo=c, hi=BIG))
        for window in windows:
            layout = cached_layout(n, index.shape[1], Band(), window, tile.blocks, q.device)
            parts.append(Part(k, v, layout, Band(), window, k_index=index, keep=plan.keep,
                              tile=tile))  # fmt: skip
    return attend(q, parts)[0]
