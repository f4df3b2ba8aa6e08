"""Adaptive span on the flash core (Sukhbaatar et al. 2019, Eq. 4-5).

One launch; every head has its own layout over distances 1 <= x <= reach_h
(the current token is not attended; bidirectionally the pair i == j is
masked by a -inf self bias): key blocks where the soft mask m is 1 are full
(no element work), the ramp's blocks are partial and weigh each p by m, and
blocks beyond the reach are never read.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from attn_zoo.kernels.autograd import attend
from attn_zoo.kernels.flash import Part, Ramp
from attn_zoo.kernels.layout import Band, BlockLayout, build_layout
from attn_zoo.kernels.tuning import tile_for


@lru_cache(maxsize=32)
def _layout(n: int, reach: tuple, flat: tuple, causal: bool, blocks: tuple[int, int],
            device) -> BlockLayout:  # fmt: skip
    far, near = torch.tensor(reach), torch.tensor(flat)  # m > 0 up to far, m = 1 up to near
    if causal:
        touched, full = Band(lo=1, hi=far), Band(lo=1, hi=near)
    else:
        touched, full = Band(lo=-far, hi=far), Band(lo=-near, hi=near)
    return build_layout(n, n, touched, full_band=full, self_pairs=not causal,
                        block_m=blocks[0], block_n=blocks[1], device=device)  # fmt: skip


def adaptive_span_attention(q, k, v, plan) -> torch.Tensor:
    tile = tile_for(q, "plain" if plan.causal else "ramp")  # |x|: more registers
    heads = range(plan.heads)
    reach = tuple(plan.reach(h) for h in heads)
    flat = tuple(plan.flat(h) for h in heads)
    layout = _layout(plan.n_q, reach, flat, plan.causal, tile.blocks, q.device)
    if plan.z is not None:  # learnable z_h: the backward gives their gradient
        spans = plan.z.to(q.device, torch.float32) + plan.shift
    else:
        spans = plan.ramp_spans_on(q.device, torch.float32)
    ramp = Ramp(spans, plan.ramp, symmetric=not plan.causal)
    far = max(reach)  # over the heads; the layout never visits blocks past each one's
    band = Band(lo=1, hi=far) if plan.causal else Band(lo=-far, hi=far)
    self_bias = None if plan.causal else float("-inf")
    part = Part(k, v, layout, band, ramp=ramp, self_bias=self_bias, keep=plan.keep, tile=tile)
    return attend(q, [part])[0]
