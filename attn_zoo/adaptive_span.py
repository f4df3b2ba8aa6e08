"""Adaptive attention span (Sukhbaatar et al. 2019, "Adaptive Attention Span
in Transformers", Sec. 3.1-3.2).

Head h attends to the keys at distance x = i - j (bidirectional: |i - j|)
weighted by the soft mask of Eq. 4,

    m_z(x) = clamp((R + z_h - x) / R, 0, 1),

applied to the attention weights after the softmax and renormalized (Eq. 5),
which equals a softmax with bias log m_z(i - j). The savings come from never
touching keys with m = 0: head h reads only its ceil(z_h + R) nearest keys,
so heads with short spans cost little (per-head bands, not one band sized for
the longest span as in the public code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attn_zoo import oracle
from attn_zoo.flex import flex, flex_options
from attn_zoo.interface import Mechanism, Plan
from attn_zoo.kernels.runtime import triton_options
from attn_zoo.registry import register
from attn_zoo.tiles import as_tiles, blocks, gather, scatter, softmax_lse, upcast, window


def default_spans(heads: int, shortest: float = 32.0, longest: float = 1024.0) -> tuple:
    """A spread like the paper's learned spans (Fig. 3): most heads short, a few
    long. z_h = shortest * (longest / shortest) ** ((h / (H - 1)) ** 3)."""
    if heads == 1:
        return (shortest,)
    ratio = longest / shortest
    return tuple(round(shortest * ratio ** ((h / (heads - 1)) ** 3), 1) for h in range(heads))


@dataclass(frozen=True)
class AdaptiveSpanConfig:
    spans: tuple[float, ...] | None = None  # z_h per head; None: default_spans over span_range
    span_range: tuple[float, float] = (32.0, 1024.0)  # shortest and longest default span
    ramp: float = 32.0  # R, the ramp's width (Sec. 3.2: R = 32)
    max_span: int = 8192  # S, the largest span a head may learn (Sec. 4: up to 8192)
    tile: int = 64  # queries per tile in the reference


@dataclass(frozen=True)
class SpanPlan(Plan):
    spans: tuple[float, ...]  # z_h, clamped to [0, max_span]
    ramp: float

    def width(self, head: int) -> int:
        """Keys with m > 0 on one side of a query: distances 0 .. width - 1."""
        return math.ceil(self.spans[head] + self.ramp)


def soft_mask(distance: torch.Tensor, span: float | torch.Tensor, ramp: float) -> torch.Tensor:
    """m_z(x) = clamp((R + z - x) / R, 0, 1), Eq. 4."""
    return ((ramp + span - distance) / ramp).clamp(0, 1)


@register
class AdaptiveSpan(Mechanism):
    name = "adaptive_span"
    small: ClassVar[dict] = {"ramp": 4.0, "span_range": (2.0, 40.0)}
    Config = AdaptiveSpanConfig
    citation = "Sukhbaatar et al. 2019, Adaptive Attention Span in Transformers (Eq. 4-5)"
    summary = "the previous z_h + R positions of head h, weighted by the soft ramp m_z"
    complexity = "O(N * sum_h (z_h + R)) time and memory"
    oracle_summary = "dense softmax with bias log m_z(i - j), per head"

    def plan(self, q, k, v, causal: bool) -> SpanPlan:
        cfg = self.config
        heads = q.shape[1]
        spans = cfg.spans if cfg.spans is not None else default_spans(heads, *cfg.span_range)
        if len(spans) != heads:
            raise ValueError(
                f"adaptive_span: {len(spans)} spans for {heads} heads; need one per head"
            )
        if cfg.ramp <= 0:
            raise ValueError(f"adaptive_span: ramp R must be positive, got {cfg.ramp}")
        spans = tuple(float(min(max(z, 0.0), cfg.max_span)) for z in spans)
        n = q.shape[2]
        return SpanPlan(q.shape[0], heads, n, n, causal, spans, float(cfg.ramp))

    def oracle(self, q, k, v, plan: SpanPlan, rows):
        i = rows.to(q.device)[:, None].double()
        j = torch.arange(plan.n_k, device=q.device, dtype=torch.float64)[None, :]
        x = (i - j) if plan.causal else (i - j).abs()
        z = torch.tensor(plan.spans, dtype=torch.float64, device=q.device).view(1, -1, 1, 1)
        m = soft_mask(x, z, plan.ramp)
        if plan.causal:
            m = m * (x >= 0)
        return [oracle.Term(torch.log(m))]


@AdaptiveSpan.implementation("reference")
def adaptive_span_reference(mech, q, k, v, plan: SpanPlan) -> torch.Tensor:
    """Per head: a band of the ceil(z_h + R) nearest keys on tiles of queries;
    softmax, times the soft mask, renormalized (Eq. 5)."""
    n, tile = plan.n_q, mech.config.tile
    qi = blocks(n, tile, q.device)
    out = []
    for h in range(plan.heads):
        width = plan.width(h)
        before = width - 1
        after = 0 if plan.causal else width - 1
        ki = window(qi[:, 0] - before, before + tile + after, n)
        i, j = qi[:, :, None], ki[:, None, :]
        x = (i - j) if plan.causal else (i - j).abs()
        qh, kh, vh = (upcast(t[:, h : h + 1]) for t in (q, k, v))
        m = soft_mask(x.to(qh.dtype), plan.spans[h], plan.ramp) * ((j >= 0) & (x >= 0))
        scores = gather(qh, as_tiles(qi)) @ gather(kh, as_tiles(ki)).transpose(-2, -1)
        scores = (scores * q.shape[-1] ** -0.5).masked_fill(m == 0, -torch.inf)
        weights = softmax_lse(scores, dim=-1)[0] * m
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
        out.append(scatter(weights @ gather(vh, as_tiles(ki)), as_tiles(qi), n))
    return torch.cat(out, dim=1).to(q.dtype)


@AdaptiveSpan.implementation("triton", **triton_options())
def adaptive_span_triton(mech, q, k, v, plan: SpanPlan) -> torch.Tensor:
    """One launch, per-head layouts, the ramp in the masked blocks (kernels/adaptive_span.py)."""
    from attn_zoo.kernels.adaptive_span import adaptive_span_attention

    return adaptive_span_attention(q, k, v, plan)


@AdaptiveSpan.implementation("flex", **flex_options())
def adaptive_span_flex(mech, q, k, v, plan: SpanPlan) -> torch.Tensor:
    """The band as a per-head block mask, log m_z(x) as the score_mod (Eq. 4-5)."""
    spans = torch.tensor(plan.spans, device=q.device)
    width = torch.tensor([plan.width(h) for h in range(plan.heads)], device=q.device)
    ramp, causal = plan.ramp, plan.causal

    def distance(i, j):
        return i - j if causal else (i - j).abs()

    def in_span(b, h, i, j):
        x = distance(i, j)
        return (x >= 0) & (x < width[h])

    def log_soft_mask(score, b, h, i, j):
        return score + torch.log(soft_mask(distance(i, j).float(), spans[h], ramp))

    return flex(q, k, v, in_span, log_soft_mask, per_head=True)[0]
