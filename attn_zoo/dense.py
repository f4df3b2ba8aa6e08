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
from attn_zoo.tiles import softmax_lse, upcast


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
    decodes = True

    def plan(self, q, k, v, causal: bool) -> Plan:
        if causal and q.shape[2] > k.shape[2]:
            raise ValueError(
                f"dense: causal attention needs len(q) <= len(k) (queries are the last "
                f"positions, SDPA's causal_lower_right), got {q.shape[2]} and {k.shape[2]}"
            )
        return Plan(q.shape[0], q.shape[1], q.shape[2], k.shape[2], causal)

    def oracle(self, q, k, v, plan: Plan, rows: torch.Tensor) -> list[oracle.Term]:
        if not plan.causal:
            zero = torch.zeros((), dtype=torch.float64, device=q.device)
            return [oracle.Term(zero, keep=plan.keep)]
        offset = plan.n_k - plan.n_q  # causal: the last query sees every key (lower right)
        visible = oracle.causal_visible(rows.to(q.device), plan.n_k, offset)
        return [oracle.Term(oracle.mask_bias(visible), keep=plan.keep)]

    def pairs(self, q, k, v, plan: Plan) -> int:
        return plan.full_pairs


@Dense.implementation("reference")
def dense_reference(mech: Dense, q, k, v, plan: Plan) -> torch.Tensor:
    """Materializes the [B, H, N, N] scores and their softmax: two N x N matrices
    are alive at the peak (the test of the harness's memory figure counts on it).
    Scores and softmax are float32 for half-precision inputs, so large scores
    that overflow float16 (|q . k| > 65504) stay finite, as in the oracle."""
    scores = torch.matmul(upcast(q), upcast(k).transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    if plan.causal:  # query i is position i + n_k - n_q (the last query sees every key)
        future = torch.ones(plan.n_q, plan.n_k, dtype=torch.bool, device=q.device)
        scores.masked_fill_(future.triu_(1 + plan.n_k - plan.n_q), -torch.inf)
    if plan.keep is not None:  # padding may leave a query no key: 0, not NaN
        scores.masked_fill_(~plan.keep[:, None, None, :], -torch.inf)
        weights = softmax_lse(scores, dim=-1)[0]
    else:
        weights = torch.softmax(scores, dim=-1)
    del scores
    return torch.matmul(weights, upcast(v)).to(q.dtype)


@Dense.implementation("triton", **triton_options("dense"))
def dense_triton(mech: Dense, q, k, v, plan: Plan) -> torch.Tensor:
    """The block-sparse flash core visiting every key block (kernels/dense.py)."""
    from attn_zoo.kernels.dense import dense_attention

    return dense_attention(q, k, v, plan.causal, keep=plan.keep)


@Dense.implementation("flex", **flex_options())
def dense_flex(mech: Dense, q, k, v, plan: Plan) -> torch.Tensor:
    offset = plan.n_k - plan.n_q
    causal = (lambda b, h, i, j: i + offset >= j) if plan.causal else None
    return flex(q, k, v, causal, keep=plan.keep, need_lse=False)[0]


@Dense.implementation("sdpa")
def dense_sdpa(mech: Dense, q, k, v, plan: Plan) -> torch.Tensor:
    if plan.keep is None and plan.n_q == plan.n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=plan.causal)
    mask = torch.ones(plan.n_q, plan.n_k, dtype=torch.bool, device=q.device)
    if plan.causal:  # lower right, as the other impls
        mask = mask.tril_(plan.n_k - plan.n_q)
    if plan.keep is not None:
        mask = mask & plan.keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # no key: 0, not NaN
