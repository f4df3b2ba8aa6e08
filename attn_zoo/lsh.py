"""Reformer LSH attention (Kitaev et al. 2020, "Reformer: The Efficient
Transformer", Sec. 2).

Shared QK: keys are the L2-normalized queries (Sec. 2.2), so ``k`` is not
read. Each of ``n_hashes`` rounds draws a random rotation R (explicit seed)
and hashes h(x) = argmax([xR; -xR]) into ``n_buckets`` buckets, by default
n_b = 2N / m for chunks of m = ``bucket_size`` (Sec. 2.3: "we set the chunk
size m = 2l / n_buckets"). Tokens are sorted by (bucket, position) and cut
into chunks of m; a query attends to the keys *of its own bucket* in its
chunk and the previous one (Eq. 3-4: P_i = {j : h(q_i) = h(k_j)}, the chunks
only bound the work). A token does not attend to itself unless nothing else
is visible (``self_penalty``, public code: -1e5). Rounds are combined by
their log-sum-exp (Sec. 2.3) after subtracting log N_ij, the number of rounds
in which j is visible to i (Eq. 7), so a key found twice counts once: the
result is one softmax over the union of the rounds' sets. The reference
subtracts log N_ij as written; the triton impl counts each pair in the first
round that shows it instead (the same union, no count per score:
:class:`attn_zoo.kernels.flash.Duplicates`).

Switches reproducing public code: ``attend_across_buckets=True`` drops the
bucket test inside the chunks (trax's option of that name; most ports do
it); ``allow_duplicate_attention=True`` skips the correction, which equals
one dense softmax with bias log c_ij (trax's option of that name).

Causal mode: chunk boundaries depend on where later tokens sort, so the
paper's causal LSH leaks the future. Here causal means: each token attends to
itself and the ``bucket_size`` most recent earlier tokens *of its own bucket*
(a window in sorted order), which depends on earlier tokens only; the
duplicate correction applies to it the same way.
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
    sorted_attention,
    sorted_flex,
    visible_sorted,
)
from attn_zoo.interface import Mechanism, Plan
from attn_zoo.kernels.device_constants import on_device
from attn_zoo.kernels.runtime import triton_installed, triton_options
from attn_zoo.kernels.sorting import sort_by_group
from attn_zoo.registry import register
from attn_zoo.tiles import merge, upcast


@dataclass(frozen=True)
class LSHConfig:
    bucket_size: int = 64  # chunk length m (Sec. 5 experiments: 64)
    n_hashes: int = 4  # rounds (Sec. 5 evaluates 1, 2, 4, 8)
    n_buckets: int | None = None  # None: 2N / m, even (Sec. 2.3)
    self_penalty: float = -1e5  # added to a token's own score (public code: -1e5)
    seed: int = 0  # draws the random rotations
    attend_across_buckets: bool = False  # True: whole chunks, any bucket (trax option)
    allow_duplicate_attention: bool = False  # True: no Eq. 7 correction (trax option)


def default_buckets(n: int, bucket_size: int) -> int:
    """n_b = 2N / m, rounded to an even count of at least 2 (Sec. 2.3)."""
    return max(2, 2 * round(n / bucket_size))


@dataclass(frozen=True, eq=False)
class LSHPlan(Plan):
    buckets: torch.Tensor  # [B, H, n_hashes, N]
    bucket_size: int
    self_penalty: float
    across_buckets: bool = False
    duplicates: bool = False  # True: rounds merged without the Eq. 7 correction
    n_buckets: int | None = None  # buckets per round (None: read from ``buckets``)

    @property
    def mode(self) -> str:
        if self.causal:
            return "window"
        return "chunks" if self.across_buckets else "buckets"

    @property
    def rounds(self) -> torch.Tensor | None:
        """Every round's buckets, for the duplicate correction (None when off)."""
        return None if self.duplicates else self.buckets


def shared_keys(q: torch.Tensor) -> torch.Tensor:
    """Shared QK: the key of token j is its query, L2-normalized (Sec. 2.2)."""
    return F.normalize(upcast(q), dim=-1).to(q.dtype)


@register
class LSH(Mechanism):
    name = "lsh"
    small: ClassVar[dict] = {"bucket_size": 8, "n_hashes": 2}
    Config = LSHConfig
    citation = "Kitaev et al. 2020, Reformer: The Efficient Transformer (Sec. 2, Eq. 3-4)"
    summary = (
        "keys of its own hash bucket in its sorted chunk and the previous one, per round "
        "(shared QK: k is not read)"
    )
    shared_qk = True
    complexity = "O(N n_hashes bucket_size) time and memory (+ a sort)"
    oracle_summary = (
        "dense softmax over shared-QK scores, 0/-inf over the union of the rounds' "
        "visible sets from the plan's sorted places (log c_ij with duplicates), self penalty"
    )

    def inputs(self, q, k, v):
        return q, shared_keys(q), v

    def plan(self, q, k, v, causal: bool) -> LSHPlan:
        cfg = self.config
        if cfg.bucket_size < 1 or cfg.n_hashes < 1:
            raise ValueError("lsh: bucket_size and n_hashes must be >= 1")
        b, h, n, d = q.shape
        n_buckets = cfg.n_buckets or default_buckets(n, cfg.bucket_size)
        if n_buckets % 2:
            raise ValueError(
                f"lsh: n_buckets must be even (argmax over [xR; -xR]), got {n_buckets}"
            )
        rotations = on_device(q.device, lambda: random_rotations(cfg, h, d, n_buckets),
                              self.name, cfg, h, d, n_buckets)  # fmt: skip
        buckets = hash_rounds(q, rotations)
        return LSHPlan(b, h, n, n, causal, buckets, cfg.bucket_size, cfg.self_penalty,
                       cfg.attend_across_buckets, cfg.allow_duplicate_attention,
                       n_buckets)  # fmt: skip

    def oracle(self, q, k, v, plan: LSHPlan, rows):
        rows = rows.to(q.device)
        _, rank = sort_by_group(plan.buckets)
        rank_i, rank_j = rank[..., rows, None], rank[..., None, :]
        group_i, group_j = plan.buckets[..., rows, None], plan.buckets[..., None, :]
        vis = visible_sorted(rank_i, rank_j, group_i, group_j, plan.bucket_size, plan.mode)
        count = vis.sum(dim=2, dtype=torch.float64)  # rounds: [B, H, R, N]
        is_self = rows[:, None] == torch.arange(plan.n_k, device=q.device)[None, :]
        # Eq. 7: the union of the rounds' sets, each key once; without it, log c_ij
        seen = torch.log(count) if plan.duplicates else oracle.mask_bias(count > 0)
        bias = seen + is_self * plan.self_penalty
        _, keys, _ = self.inputs(q, k, v)
        return [oracle.Term(bias, k=keys, keep=plan.keep)]

    def pairs(self, q, k, v, plan: LSHPlan) -> int:
        return group_pairs(plan.buckets, plan.bucket_size, plan.mode)


def random_rotations(cfg: LSHConfig, heads: int, dim: int, n_buckets: int) -> torch.Tensor:
    """The random rotations R [H, n_hashes, D, b/2] of each head and round (Sec. 2.1),
    drawn from ``cfg.seed`` on the host (the same on every device)."""
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(heads, cfg.n_hashes, dim, n_buckets // 2, generator=g,
                       dtype=torch.float32)  # fmt: skip


def hash_rounds(q: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Every round's buckets [B, H, rounds, N] of the shared keys of q (Sec. 2.2) under
    rotations [H, rounds, D, b/2]: on a GPU one kernel that normalizes the keys and
    never writes xR (:mod:`attn_zoo.kernels.hashing`), else :func:`hash_round` per
    round on the keys in float32."""

    def per_round():
        keys = shared_keys(q).float()
        rounds = range(rotations.shape[1])
        return torch.stack([hash_round(keys, rotations[:, r]) for r in rounds], 2)

    if triton_installed():
        from attn_zoo.kernels import hashing

        if hashing.runs_on(q):
            return hashing.hash_rounds(q, rotations, per_round, normalize=True)
    return per_round()


def hash_round(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """h(x) = argmax([xR; -xR]) (Sec. 2.1) for x [B, H, N, D] and one round's
    rotations [H, D, b/2]: [B, H, N] buckets, holding only this round's xR (never the
    concatenation; ties go to the first index, as argmax over it would)."""
    xr = torch.matmul(x, rotation[None])  # [B, H, N, b/2], x read in place (no permuted copy)
    top, low = xr.max(dim=-1), xr.min(dim=-1)
    return torch.where(top.values >= -low.values, top.indices, xr.shape[-1] + low.indices)


def _merged_rounds(attention, q, v, plan: LSHPlan) -> torch.Tensor:
    """Each hash round through ``attention`` (sorted order, shared QK), merged into
    the rounds before it by their log-sum-exp (Sec. 2.3) as it comes, so that one
    partial result is held, not one per round."""
    keys = shared_keys(q)
    total = None
    for r in range(plan.buckets.shape[2]):
        result = attention(q, keys, v, plan.buckets[:, :, r], plan.bucket_size, plan.mode,
                           plan.self_penalty, plan.rounds, plan.keep)  # fmt: skip
        total = result if total is None else merge([total, result])
    return total[0].to(q.dtype)


@LSH.implementation("reference")
def lsh_reference(mech, q, k, v, plan: LSHPlan) -> torch.Tensor:
    return _merged_rounds(sorted_attention, q, v, plan)


@LSH.implementation("triton", **triton_options("duplicates"))
def lsh_triton(mech, q, k, v, plan: LSHPlan) -> torch.Tensor:
    """One sorted part per round, merged by log-sum-exp (kernels/grouped.py)."""
    from attn_zoo.kernels.autograd import attend
    from attn_zoo.kernels.grouped import SortedRounds, round_codes, sorted_parts

    b, h = q.shape[:2]
    order = SortedRounds.of(plan.buckets, b, h)  # one sort for the parts and the codes
    duplicates = None
    if plan.rounds is not None:  # Eq. 7's codes, shared by every round's part
        duplicates = round_codes(plan.rounds, b, h, plan.bucket_size, plan.mode, plan.n_buckets,
                                 place=order.places(b, h))  # fmt: skip
    parts = sorted_parts(q, shared_keys(q), v, plan.buckets, plan.bucket_size, plan.mode,
                         plan.self_penalty, duplicates, keep=plan.keep, prune=False,
                         order=order)  # fmt: skip
    return attend(q, parts)[0]


@LSH.implementation("flex", **flex_options())
def lsh_flex(mech, q, k, v, plan: LSHPlan) -> torch.Tensor:
    """Per round, FlexAttention in sorted order; rounds merged by log-sum-exp."""
    return _merged_rounds(sorted_flex, q, v, plan)
