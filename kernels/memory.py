"""Segment-recurrent attention on the flash core: Transformer-XL (Dai et al.
2019) and the Compressive Transformer (Rae et al. 2019).

Segment s = i // L sees the memory [sL - M, sL) and its own segment (causal
within it): a :class:`Window` on key positions. XL adds the relative-position
term in the kernel (Sec. 3.3) as products of per-position features, one part
per range of distances that has its own (:func:`attn_zoo.xl.relative_terms`).
Compressive then accumulates a second launch over the compressed slots its
caller computed: segment s sees the slot window ``plan.slot_window(s)``, n slots
further on per segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attn_zoo.kernels.autograd import attend
from attn_zoo.kernels.flash import Part, Relative
from attn_zoo.kernels.layout import BIG, Band, Window, cached_layout
from attn_zoo.kernels.tuning import tile_for


def _band(causal: bool, same_length: bool, mem_len: int) -> Band:
    """Causal: j <= i; same_length: i - j < M (XL's memory-length cap)."""
    return Band(lo=0 if causal else -BIG, hi=mem_len - 1 if same_length else BIG)


def _raw_part(q, k, v, plan, band: Band, relative=None) -> Part:
    """Memory and own segment; the memory keys are stop-gradient (XL Sec. 3.2)."""
    seg, mem = plan.segment_len, plan.mem_len
    window = Window(seg_len=seg, step=seg, lo=-mem, hi=seg - 1)
    tile = tile_for(q, "relative" if relative is not None else "plain")
    layout = cached_layout(plan.n_q, plan.n_k, band, window, tile.blocks, q.device)
    return Part(k, v, layout, band, window, relative=relative, keep=plan.keep, frozen_memory=True,
                tile=tile)  # fmt: skip


def xl_attention(q, k, v, plan, terms: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]]):
    """XL's output: the content term (q_i + u) . k_j, and ``terms`` (lo, hi, f, g):
    pairs with lo <= i - j <= hi get the relative term f_i . g_j (:class:`Relative`),
    a part each (merged by log-sum-exp)."""
    band = _band(plan.causal, plan.same_length, plan.mem_len)
    parts = []
    for lo, hi, f, g in terms:
        within = Band(max(band.lo, lo), min(band.hi, hi))
        if within.lo <= within.hi:
            parts.append(_raw_part(q, k, v, plan, within, Relative(f, g)))
    real = torch.promote_types(q.dtype, torch.float32)  # q + u in float32 (two passes)
    content = torch.add(q, plan.u[:, None, :].to(real)).to(q.dtype)
    return attend(content, parts)[0]


def compressive_attention(q, k, v, ck, cv, plan, slot_keep=None):
    """(out, lse) over [compressed slots ck, cv [B, H, G, D]; memory; segment];
    ``slot_keep`` [B, G] hides slots that hold a padded position."""
    parts = [_raw_part(q, k, v, plan, _band(plan.causal, False, plan.mem_len))]
    if plan.slots > 0 and plan.cmem_len > 0 and plan.per_segment > 0:
        first = -plan.cmem_len - plan.first_slot  # slot_window(s) = s n + first, Mc wide
        window = Window(seg_len=plan.segment_len, step=plan.per_segment, lo=first,
                        hi=first + plan.cmem_len - 1)  # fmt: skip
        tile = tile_for(q)
        layout = cached_layout(plan.n_q, plan.slots, Band(), window, tile.blocks, q.device)
        parts.append(Part(ck, cv, layout, Band(), window, keep=slot_keep, tile=tile))
    return attend(q, parts)
