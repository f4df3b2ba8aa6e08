"""Reformer LSH attention (Kitaev et al. 2020, "Reformer: The Efficient
Transformer", Sec. 2).

Shared QK: keys are the L2-normalized queries. Each of ``n_hashes`` rounds
draws a random rotation R (explicit seed) and hashes h(x) = argmax([xR; -xR])
into ``n_buckets`` buckets (Sec. 2, "Locality sensitive hashing"). Tokens are
sorted by (bucket, position) and cut into chunks of ``bucket_size``; each
chunk attends to itself and the previous chunk (Eq. 3-4, Fig. 2). A token
does not attend to itself unless nothing else is visible. Rounds are combined
by their log-sum-exp (Sec. 2.3), which equals one dense softmax with bias
log c_ij, c_ij = the rounds in which key j is visible to query i.

Causal mode: chunk boundaries depend on where later tokens sort, so the
paper's causal LSH leaks the future. Here causal means: each token attends to
itself and the ``bucket_size`` most recent earlier tokens *of its own bucket*
(a window in sorted order), which depends on earlier tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attn_zoo import oracle
from attn_zoo.flex import flex_options
from attn_zoo.grouped import (
    group_pairs,
    sort_by_group,
    sorted_attention,
    sorted_flex,
    visible_sorted,
)
from attn_zoo.interface import Mechanism, Plan
from attn_zoo.kernels.runtime import triton_options
from attn_zoo.registry import register
from attn_zoo.tiles import merge, upcast


@dataclass(frozen=True)
class LSHConfig:
    bucket_size: int = 64  # chunk length m (Sec. 5: 64? experiments use chunks of 64)
    n_hashes: int = 4  # rounds (Sec. 5 evaluates 1, 2, 4, 8)
    n_buckets: int | None = None  # None: about N / bucket_size, even
    self_penalty: float = -1e5  # added to a token's own score (public code: -1e5)
    seed: int = 0  # draws the random rotations


@dataclass(frozen=True, eq=False)
class LSHPlan(Plan):
    buckets: torch.Tensor  # [B, H, n_hashes, N]
    bucket_size: int
    self_penalty: float

    @property
    def mode(self) -> str:
        return "window" if self.causal else "chunks"


def shared_keys(q: torch.Tensor) -> torch.Tensor:
    """Shared QK: the key of token j is its query, L2-normalized (Sec. 2.2)."""
    return F.normalize(upcast(q), dim=-1).to(q.dtype)


@register
class LSH(Mechanism):
    name = "lsh"
    small: ClassVar[dict] = {"bucket_size": 8, "n_hashes": 2}
    Config = LSHConfig
    citation = "Kitaev et al. 2020, Reformer: The Efficient Transformer (Sec. 2, Eq. 3-4)"
    summary = "keys in its sorted chunk and the previous one, per hash round (shared QK)"
    complexity = "O(N n_hashes bucket_size) time and memory (+ a sort)"
    oracle_summary = (
        "dense softmax over shared-QK scores with bias log c_ij (rounds in which j is "
        "visible, from the plan's sorted places) and the self penalty"
    )

    def inputs(self, q, k, v):
        return q, shared_keys(q), v

    def plan(self, q, k, v, causal: bool) -> LSHPlan:
        cfg = self.config
        if cfg.bucket_size < 1 or cfg.n_hashes < 1:
            raise ValueError("lsh: bucket_size and n_hashes must be >= 1")
        b, h, n, d = q.shape
        n_buckets = cfg.n_buckets or max(2, 2 * round(n / (2 * cfg.bucket_size)))
        if n_buckets % 2:
            raise ValueError(
                f"lsh: n_buckets must be even (argmax over [xR; -xR]), got {n_buckets}"
            )
        g = torch.Generator().manual_seed(cfg.seed)
        rotations = torch.randn(h, cfg.n_hashes, d, n_buckets // 2, generator=g).to(q.device)
        rotated = torch.einsum("bhnd,hrdk->bhrnk", shared_keys(q).float(), rotations)
        buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
        return LSHPlan(b, h, n, n, causal, buckets, cfg.bucket_size, cfg.self_penalty)

    def oracle(self, q, k, v, plan: LSHPlan, rows):
        rows = rows.to(q.device)
        _, rank = sort_by_group(plan.buckets)
        rank_i, rank_j = rank[..., rows, None], rank[..., None, :]
        group_i, group_j = plan.buckets[..., rows, None], plan.buckets[..., None, :]
        vis = visible_sorted(rank_i, rank_j, group_i, group_j, plan.bucket_size, plan.mode)
        count = vis.sum(dim=2, dtype=torch.float64)  # rounds: [B, H, R, N]
        is_self = rows[:, None] == torch.arange(plan.n_k, device=q.device)[None, :]
        bias = torch.log(count) + is_self * plan.self_penalty
        _, keys, _ = self.inputs(q, k, v)
        return [oracle.Term(bias, k=keys)]

    def pairs(self, q, k, v, plan: LSHPlan) -> int:
        return group_pairs(plan.buckets, plan.bucket_size, plan.mode)


def _merged_rounds(attention, q, v, plan: LSHPlan) -> torch.Tensor:
    """Each hash round through ``attention`` (sorted order, shared QK), the rounds
    merged by their log-sum-exp (Sec. 2.3)."""
    keys = shared_keys(q)
    rounds = [
        attention(q, keys, v, plan.buckets[:, :, r], plan.bucket_size, plan.mode,
                  plan.self_penalty)
        for r in range(plan.buckets.shape[2])
    ]  # fmt: skip
    return merge(rounds)[0].to(q.dtype)


@LSH.implementation("reference")
def lsh_reference(mech, q, k, v, plan: LSHPlan) -> torch.Tensor:
    return _merged_rounds(sorted_attention, q, v, plan)


@LSH.implementation("triton", **triton_options())
def lsh_triton(mech, q, k, v, plan: LSHPlan) -> torch.Tensor:
    """One sorted launch per round, each accumulating into the last (kernels/grouped.py)."""
    from attn_zoo.kernels.grouped import sorted_flash

    keys, out, lse = shared_keys(q), None, None
    for r in range(plan.buckets.shape[2]):
        out, lse = sorted_flash(
            q, keys, v, plan.buckets[:, :, r], plan.bucket_size, plan.mode, plan.self_penalty,
            out=out, lse=lse, accumulate=r > 0,
        )  # fmt: skip
    return out


@LSH.implementation("flex", **flex_options())
def lsh_flex(mech, q, k, v, plan: LSHPlan) -> torch.Tensor:
    """Per round, FlexAttention in sorted order; rounds merged by log-sum-exp."""
    return _merged_rounds(sorted_flex, q, v, plan)
