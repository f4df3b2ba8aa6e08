"""Adaptive attention span (Sukhbaatar et al. 2019, "Adaptive Attention Span
in Transformers", Sec. 3.1-3.2).

Eq. 5 attends to the previous S positions t - S ... t - 1 (the current token
is not attended): head h weights the key at distance x = t - r, 1 <= x <= S,
by the soft mask of Eq. 4,

    m_z(x) = clamp((R + z_h - x) / R, 0, 1),

applied after the softmax and renormalized, which equals a softmax with bias
log m_z(x) over those keys. The cap S bounds the window itself, not only z_h.
Bidirectionally the window is mirrored: 1 <= |i - j| <= S.

Switch: ``ramp_shift=1`` reproduces the authors' code, which evaluates the
ramp at m_z(x - 1) on distances 1 ... S ("attention doesn't include the
current step itself"), so its window is one key longer (z = 3, R = 4, t = 30:
the paper attends 24 ... 29, the authors' code 23 ... 29).

The savings come from never touching keys with m = 0: head h reads only the
keys within its own reach (per-head bands, not one band sized for the longest
span as in the public code). A row with no key in reach (t = 0 in causal
mode) gives 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from attn_zoo import oracle
from attn_zoo.flex import flex, flex_options
from attn_zoo.interface import Mechanism, Plan
from attn_zoo.kernels.device_constants import on_device
from attn_zoo.kernels.runtime import triton_options
from attn_zoo.registry import register
from attn_zoo.tiles import (
    as_tiles,
    blocks,
    chunks,
    gather,
    key_mask,
    run_chunk,
    scatter,
    softmax_lse,
    upcast,
    window,
)


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
    max_span: int = 8192  # S: z_h <= S and distances <= S (Eq. 5; Sec. 4: up to 8192)
    ramp_shift: int = 0  # 0: m_z(x), Eq. 4-5; 1: m_z(x - 1), the authors' code
    tile: int = 64  # queries per tile in the reference


@dataclass(frozen=True)
class SpanPlan(Plan):
    spans: tuple[float, ...]  # z_h, clamped to [0, max_span]
    ramp: float  # R
    max_span: int  # S
    shift: int  # the ramp is m_z(x - shift)
    z: torch.Tensor | None = field(default=None, compare=False)  # learnable z_h [H]

    def reach(self, head: int) -> int:
        """The farthest distance head h attends (m > 0 and x <= S); it attends
        distances 1 .. reach (0 keys when reach is 0)."""
        return max(0, min(self.max_span, math.ceil(self.spans[head] + self.ramp + self.shift) - 1))

    def flat(self, head: int) -> int:
        """The farthest distance where the ramp is still 1 (no bias needed)."""
        return max(0, min(self.max_span, math.floor(self.spans[head]) + self.shift))

    def ramp_spans(self) -> tuple[float, ...]:
        """z_h + shift: m_z(x - shift) = clamp((R + z_h + shift - x) / R, 0, 1)."""
        return tuple(z + self.shift for z in self.spans)

    def ramp_spans_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`ramp_spans` as a tensor [H] on ``device``, made once per values."""
        spans = self.ramp_spans()
        return on_device(device, lambda: torch.tensor(spans, dtype=dtype), "spans", dtype, spans)

    def weight(self, distance: torch.Tensor, head: int | torch.Tensor) -> torch.Tensor:
        """m_z(x - shift) on 1 <= x <= S, 0 elsewhere (Eq. 4-5); ``head`` an int or a
        tensor of heads broadcasting against ``distance``."""
        if self.z is not None:  # learnable spans: the gradient reaches z_h through m_z
            spans = self.z.to(distance.device) + self.shift
        else:
            spans = self.ramp_spans_on(distance.device, torch.get_default_dtype())
        z = spans[head]
        inside = (distance >= 1) & (distance <= self.max_span)
        return soft_mask(distance.to(spans.dtype), z, self.ramp) * inside


def soft_mask(distance: torch.Tensor, span: float | torch.Tensor, ramp: float) -> torch.Tensor:
    """m_z(x) = clamp((R + z - x) / R, 0, 1), Eq. 4."""
    return ((ramp + span - distance) / ramp).clamp(0, 1)


@register
class AdaptiveSpan(Mechanism):
    name = "adaptive_span"
    small: ClassVar[dict] = {"ramp": 4.0, "span_range": (2.0, 40.0)}
    Config = AdaptiveSpanConfig
    citation = "Sukhbaatar et al. 2019, Adaptive Attention Span in Transformers (Eq. 4-5)"
    summary = "the previous z_h + R positions of head h (not itself, at most S), ramp m_z"
    complexity = "O(N * sum_h (z_h + R)) time and memory"
    oracle_summary = "dense softmax with bias log m_z(i - j), per head"
    decodes = True

    def learnable(self, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
        """z_h [H] (Sec. 3.2: learned per head, in [0, S]), at the configured spans."""
        cfg = self.config
        spans = cfg.spans if cfg.spans is not None else default_spans(heads, *cfg.span_range)
        return {"spans": torch.tensor(spans, dtype=torch.float32)}

    def plan(self, q, k, v, causal: bool, params: dict | None = None) -> SpanPlan:
        cfg = self.config
        heads = q.shape[1]
        z = None
        if params:  # learnable z_h, clamped to [0, S] as the paper does
            z = params["spans"].clamp(0, cfg.max_span)
            spans = tuple(z.detach().cpu().tolist())
        else:
            spans = cfg.spans if cfg.spans is not None else default_spans(heads, *cfg.span_range)
        if len(spans) != heads:
            raise ValueError(
                f"adaptive_span: {len(spans)} spans for {heads} heads; need one per head"
            )
        if cfg.ramp <= 0:
            raise ValueError(f"adaptive_span: ramp R must be positive, got {cfg.ramp}")
        if cfg.max_span < 1:
            raise ValueError(f"adaptive_span: max_span S must be >= 1, got {cfg.max_span}")
        if cfg.ramp_shift not in (0, 1):
            raise ValueError(
                f"adaptive_span: ramp_shift must be 0 (the paper) or 1 (the authors' code), "
                f"got {cfg.ramp_shift}"
            )
        spans = tuple(float(min(max(z, 0.0), cfg.max_span)) for z in spans)
        n = q.shape[2]
        return SpanPlan(
            q.shape[0], heads, n, n, causal, spans, float(cfg.ramp), cfg.max_span, cfg.ramp_shift, z
        )

    def oracle(self, q, k, v, plan: SpanPlan, rows):
        """Eq. 5 written out: weight m_z(x - shift) for keys at distance 1 <= x <= S."""
        i = rows.to(q.device)[:, None].double()
        j = torch.arange(plan.n_k, device=q.device, dtype=torch.float64)[None, :]
        x = (i - j) if plan.causal else (i - j).abs()
        z = torch.tensor(plan.spans, dtype=torch.float64, device=q.device).view(1, -1, 1, 1)
        m = ((plan.ramp + z - (x - plan.shift)) / plan.ramp).clamp(0, 1)
        m = m * ((x >= 1) & (x <= plan.max_span))
        return [oracle.Term(torch.log(m), keep=plan.keep)]


@AdaptiveSpan.implementation("reference")
def adaptive_span_reference(mech, q, k, v, plan: SpanPlan) -> torch.Tensor:
    """Per head: the band of keys within reach on tiles of queries; softmax,
    times the soft mask, renormalized (Eq. 5)."""
    n, tile = plan.n_q, mech.config.tile
    qi = blocks(n, tile, q.device)

    def tiles(q, k, v, qi, h):  # head h's query tiles qi [t, tile]
        before = plan.reach(h)
        after = 0 if plan.causal else before
        ki = window(qi[:, 0] - before, before + tile + after, n)
        i, j = qi[:, :, None], ki[:, None, :]
        x = (i - j) if plan.causal else (i - j).abs()
        qh, kh, vh = (upcast(t) for t in (q, k, v))
        m = plan.weight(x, h).to(qh.dtype) * (j >= 0)
        scores = gather(qh, as_tiles(qi)) @ gather(kh, as_tiles(ki)).transpose(-2, -1)
        scores = (scores * q.shape[-1] ** -0.5).masked_fill(m == 0, -torch.inf)
        kept = key_mask(plan.keep, as_tiles(ki))  # [B, 1, t, width] or None
        if kept is not None:
            scores = scores.masked_fill(~kept.unsqueeze(-2), -torch.inf)
        weights = softmax_lse(scores, dim=-1)[0] * m
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
        return weights @ gather(vh, as_tiles(ki))

    out = []
    for h in range(plan.heads):  # a chunk of query tiles at a time
        width = plan.reach(h) * (1 if plan.causal else 2) + tile
        qkv = tuple(t[:, h : h + 1] for t in (q, k, v))
        parts = chunks(len(qi), tile, width, q[:, :1])
        done = [run_chunk(tiles, *qkv, qi[part], h) for part in parts]
        out.append(scatter(torch.cat(done, dim=2), as_tiles(qi), n))
    return torch.cat(out, dim=1).to(q.dtype)


@AdaptiveSpan.implementation("triton", **triton_options("ramp"))
def adaptive_span_triton(mech, q, k, v, plan: SpanPlan) -> torch.Tensor:
    """One launch, per-head layouts, the ramp in the masked blocks (kernels/adaptive_span.py)."""
    from attn_zoo.kernels.adaptive_span import adaptive_span_attention

    return adaptive_span_attention(q, k, v, plan)


@AdaptiveSpan.implementation("flex", **flex_options())
def adaptive_span_flex(mech, q, k, v, plan: SpanPlan) -> torch.Tensor:
    """The band 1 <= x <= reach as a per-head block mask, log m_z(x - shift) as the
    score_mod (Eq. 4-5)."""
    spans = torch.tensor(plan.ramp_spans(), device=q.device)
    reach = torch.tensor([plan.reach(h) for h in range(plan.heads)], device=q.device)
    ramp, causal = plan.ramp, plan.causal

    def distance(i, j):
        return i - j if causal else (i - j).abs()

    def in_span(b, h, i, j):
        x = distance(i, j)
        return (x >= 1) & (x <= reach[h])

    def log_soft_mask(score, b, h, i, j):
        return score + torch.log(soft_mask(distance(i, j).float(), spans[h], ramp))

    return flex(q, k, v, in_span, log_soft_mask, per_head=True, keep=plan.keep, need_lse=False)[0]
