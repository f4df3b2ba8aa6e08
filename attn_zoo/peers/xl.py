"""xl's peer: local-attention's ``LocalAttention`` (the package Transformer-XL-style
models use for segment-local attention; the authors' Transformer-XL is research
code, not a package).

Windows of ``segment_len`` looking ``mem_len / segment_len`` windows back give
each query its segment (causally, or whole) and a memory of ``mem_len``
positions: Transformer-XL's visible set (Dai et al. 2019, Sec. 3.2) when
``mem_len`` is a whole number of segments. The package scores q . k only: no
relative-position terms (Eq. in Sec. 3.3: u, v, W_R), and its memory is not
stop-gradient."""

from __future__ import annotations

import torch

from attn_zoo.peers.common import local_windows, peer_options, refuse_padding
from attn_zoo.validation import Unsupported
from attn_zoo.xl import XL, XLPlan

PACKAGE = ("local_attention", "local-attention")


def differences(mech: XL, causal: bool) -> str:
    return (
        "local-attention LocalAttention: the same visible keys, scored q . k without "
        "Transformer-XL's relative-position terms (u, v, W_R); memory not stop-gradient"
    )


@XL.implementation("peer", **peer_options(PACKAGE, variant=differences))
def xl_peer(mech: XL, q, k, v, plan: XLPlan) -> torch.Tensor:
    refuse_padding(plan, "xl/peer")
    seg, mem = plan.segment_len, plan.mem_len
    if mem % seg or plan.same_length:
        raise Unsupported(
            f"xl/peer: local-attention looks back whole windows; it needs mem_len a multiple "
            f"of segment_len and same_length=False, got mem_len {mem}, segment_len {seg}, "
            f"same_length {plan.same_length}"
        )
    return local_windows(q, k, v, seg, causal=plan.causal, look_backward=mem // seg,
                         look_forward=0)  # fmt: skip
