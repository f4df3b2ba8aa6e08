"""Dense attention (Vaswani et al. 2017, Eq. 1): softmax(Q K^T / sqrt(d)) V.

The baseline every other mechanism is measured against. ``reference`` is the
textbook materialized form; ``sdpa`` is PyTorch's fused
``scaled_dot_product_attention``, the peer the kernels race.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attn_zoo import oracle
from attn_zoo.flex import flex, flex_options
from attn_zoo.interface import Mechanism, Plan
from attn_zoo.kernels.runtime import triton_options
from attn_zoo.registry import register
from attn_zoo.tiles import upcast


@dataclass(frozen=True)
class DenseConfig:
    """Dense attention has no parameters beyond the scale 1/sqrt(head_dim)."""


@register
class Dense(Mechanism):
    name = "dense"
    Config = DenseConfig
    citation = "Vaswani et al. 2017, Attention Is All You Need (Eq. 1)"
    summary = "every key (causal: every earlier key)"
    complexity = "O(N^2) time and memory"
    oracle_summary = "softmax(QK^T/sqrt(d) + causal 0/-inf mask) V in float64"
    self_attention = False

    def plan(self, q, k, v, causal: bool) -> Plan:
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(
                f"dense: causal attention needs len(q) == len(k), got {q.shape[2]} and "
                f"{k.shape[2]}; use causal=False for cross-attention"
            )
        return Plan(q.shape[0], q.shape[1], q.shape[2], k.shape[2], causal)

    def oracle(self, q, k, v, plan: Plan, rows: torch.Tensor) -> list[oracle.Term]:
        if not plan.causal:
            return [oracle.Term(torch.zeros((), dtype=torch.float64, device=q.device))]
        return [oracle.Term(oracle.mask_bias(oracle.causal_visible(rows.to(q.device), plan.n_k)))]

    def pairs(self, q, k, v, plan: Plan) -> int:
        return plan.full_pairs


@Dense.implementation("reference")
def dense_reference(mech: Dense, q, k, v, plan: Plan) -> torch.Tensor:
    """Materializes the [B, H, N, N] scores and their softmax: two N x N matrices
    are alive at the peak (the test of the harness's memory figure counts on it).
    Scores and softmax are float32 for half-precision inputs, so large scores
    that overflow float16 (|q . k| > 65504) stay finite, as in the oracle."""
    scores = torch.matmul(upcast(q), upcast(k).transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    if plan.causal:
        future = torch.ones(plan.n_q, plan.n_k, dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(future, -torch.inf)
    weights = torch.softmax(scores, dim=-1)
    del scores
    return torch.matmul(weights, upcast(v)).to(q.dtype)


@Dense.implementation("triton", **triton_options())
def dense_triton(mech: Dense, q, k, v, plan: Plan) -> torch.Tensor:
    """The block-sparse flash core visiting every key block (kernels/dense.py)."""
    from attn_zoo.kernels.dense import dense_attention

    return dense_attention(q, k, v, plan.causal)


@Dense.implementation("flex", **flex_options())
def dense_flex(mech: Dense, q, k, v, plan: Plan) -> torch.Tensor:
    offset = plan.n_k - plan.n_q
    causal = (lambda b, h, i, j: i + offset >= j) if plan.causal else None
    return flex(q, k, v, causal)[0]


@Dense.implementation("sdpa")
def dense_sdpa(mech: Dense, q, k, v, plan: Plan) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=plan.causal)
