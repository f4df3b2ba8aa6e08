"""Adaptive span on the flash core (Sukhbaatar et al. 2019, Eq. 4-5).

One launch; every head has its own layout: key blocks where the soft mask m is
1 are full (no element work), the ramp's blocks are partial and add log m,
and blocks beyond ceil(z_h + R) are never read.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from attn_zoo.kernels.flash import Ramp, block_size, flash_attention
from attn_zoo.kernels.layout import Band, BlockLayout, build_layout


@lru_cache(maxsize=32)
def _layout(n: int, spans: tuple, ramp: float, causal: bool, block: int, device) -> BlockLayout:
    width = torch.tensor([math.ceil(z + ramp) for z in spans])  # distances 0 .. width - 1
    inner = torch.tensor([math.floor(z) for z in spans])  # m = 1 up to here
    if causal:
        touched, full = Band(lo=0, hi=width - 1), Band(lo=0, hi=inner)
    else:
        touched, full = Band(lo=1 - width, hi=width - 1), Band(lo=-inner, hi=inner)
    return build_layout(n, n, touched, full_band=full, block_m=block, block_n=block, device=device)


def adaptive_span_attention(q, k, v, plan) -> torch.Tensor:
    block = block_size(q.shape[-1])
    layout = _layout(plan.n_q, plan.spans, plan.ramp, plan.causal, block, q.device)
    spans = torch.tensor(plan.spans, dtype=torch.float32, device=q.device)
    ramp = Ramp(spans, plan.ramp, symmetric=not plan.causal)
    band = Band(lo=0) if plan.causal else Band()
    return flash_attention(q, k, v, layout, band, ramp=ramp)[0]
