"""Sparse Transformer patterns (Child et al. 2019, "Generating Long Sequences
with Sparse Transformers", Sec. 4.2-4.3).

Both patterns are used as one *merged head* attending to A1(i) ∪ A2(i) (the
paper's third option, "merged" attention, Eq. 2 with p = 1 over the union).
Sets are token-exact, as in the paper's equations, for any stride; the
default stride is rounded to ``block`` so that kernel tiles line up with it.

strided, stride l:
    A1(i) = {j : max(0, i - l) <= j <= i}          (bidirectional: |i - j| <= l)
    A2(i) = {j <= i : (i - j) mod l = 0}           (bidirectional: any j)
fixed, stride l, summary width c:
    A1(i) = {j <= i : floor(j / l) = floor(i / l)} (bidirectional: the whole block)
    A2(i) = {j <= i : j mod l >= l - c}            (bidirectional: any j)

The references compute the union as two disjoint parts merged by their
log-sum-exp, each on gathered tiles: cost about N * (l + N / l), i.e.
O(N sqrt N) with l near sqrt(N).
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
from attn_zoo.tiles import as_tiles, attend_tiles, blocks, merge, window


def auto_stride(n: int, block: int) -> int:
    """l about sqrt(N) (Child et al. 2019, Sec. 4.2), rounded to a multiple of ``block``."""
    return max(block, round(math.sqrt(n) / block) * block)


@dataclass(frozen=True)
class StridedConfig:
    stride: int | None = None  # l; None: about sqrt(N), rounded to `block` (Sec. 4.2)
    block: int = 32  # the default l is a multiple of it


@dataclass(frozen=True)
class FixedConfig:
    stride: int | None = None  # l; None: about sqrt(N), rounded to `block` (Sec. 4.2)
    summary: int = 8  # c, in tokens; the paper uses c in {8, 16, 32} (Sec. 4.2)
    block: int = 32


@dataclass(frozen=True)
class SparsePlan(Plan):
    stride: int
    summary: int  # c (0 for the strided pattern)


def _check_config(name: str, stride: int | None, block: int, summary: int = 0) -> None:
    if block < 1 or (stride is not None and stride < 1):
        raise ValueError(f"{name}: stride and block must be positive integers")
    if not 0 <= summary <= (stride or block):
        raise ValueError(f"{name}: summary width c must be in [0, stride]")


class _Sparse(Mechanism):
    complexity = "O(N sqrt N) time and memory (l ~ sqrt N)"
    decodes = True

    def plan(self, q, k, v, causal: bool) -> SparsePlan:
        cfg = self.config
        summary = getattr(cfg, "summary", 0)
        _check_config(self.name, cfg.stride, cfg.block, summary)
        n = q.shape[2]
        stride = cfg.stride or auto_stride(n, cfg.block)
        return SparsePlan(q.shape[0], q.shape[1], n, n, causal, stride, min(summary, stride))


def _band(q, k, v, plan: SparsePlan, half_width: int, same_block: bool):
    """Part A1 on tiles of l queries: keys with |i - j| <= half_width (causal:
    0 <= i - j), or, with ``same_block``, keys in the query's own block."""
    n, l = plan.n_q, plan.stride
    qi = blocks(n, l, q.device)  # [nb, l]
    before = -(-half_width // l) * l
    after = 0 if plan.causal else before
    ki = window(qi[:, 0] - before, before + l + after, n)  # [nb, width]
    i, j = qi[:, :, None], ki[:, None, :]
    vis = (j >= 0) & ((i - j).abs() <= half_width)
    if same_block:
        vis &= i // l == j // l
    if plan.causal:
        vis &= j <= i
    return attend_tiles(q, k, v, as_tiles(qi), as_tiles(ki), vis, keep=plan.keep)


@register
class SparseStrided(_Sparse):
    name = "sparse_strided"
    small: ClassVar[dict] = {"stride": 8}
    Config = StridedConfig
    citation = "Child et al. 2019, Generating Long Sequences with Sparse Transformers (Sec. 4.2)"
    summary = "the previous l positions, plus every l-th earlier position (merged head)"
    oracle_summary = "dense softmax with a 0/-inf mask of A1 ∪ A2 built position by position"

    def oracle(self, q, k, v, plan: SparsePlan, rows):
        i = rows.to(q.device)[:, None]
        j = torch.arange(plan.n_k, device=q.device)[None, :]
        l = plan.stride
        a1 = (i - j).abs() <= l
        a2 = (i - j) % l == 0
        vis = a1 | a2
        if plan.causal:
            vis &= j <= i
        return [oracle.Term(oracle.mask_bias(vis), keep=plan.keep)]


@SparseStrided.implementation("reference")
def strided_reference(mech, q, k, v, plan: SparsePlan) -> torch.Tensor:
    n, l = plan.n_q, plan.stride
    band = _band(q, k, v, plan, half_width=l, same_block=False)
    # A2 beyond the band: positions with the same residue i mod l form a
    # column of the [N/l, l] grid; each column attends within itself.
    cols = as_tiles(blocks(n, l, q.device).T.contiguous())  # [1, 1, l, N/l]
    i, j = cols[..., :, None], cols[..., None, :]
    vis = (j >= 0) & ((i - j).abs() > l)
    if plan.causal:
        vis &= j < i
    far = attend_tiles(q, k, v, cols, cols, vis, keep=plan.keep)
    return merge([band, far])[0].to(q.dtype)


@SparseStrided.implementation("triton", **triton_options())
def strided_triton(mech, q, k, v, plan: SparsePlan) -> torch.Tensor:
    """Band launch + column-major launch accumulated into it (kernels/sparse.py)."""
    from attn_zoo.kernels.sparse import strided_attention

    return strided_attention(q, k, v, plan)


@register
class SparseFixed(_Sparse):
    name = "sparse_fixed"
    small: ClassVar[dict] = {"stride": 8, "summary": 3}
    Config = FixedConfig
    citation = "Child et al. 2019, Generating Long Sequences with Sparse Transformers (Sec. 4.2)"
    summary = "its own block of length l, plus the last c positions of every earlier block"
    oracle_summary = "dense softmax with a 0/-inf mask of A1 ∪ A2 built position by position"

    def oracle(self, q, k, v, plan: SparsePlan, rows):
        i = rows.to(q.device)[:, None]
        j = torch.arange(plan.n_k, device=q.device)[None, :]
        l, c = plan.stride, plan.summary
        vis = (i // l == j // l) | (j % l >= l - c)
        if plan.causal:
            vis &= j <= i
        return [oracle.Term(oracle.mask_bias(vis), keep=plan.keep)]


@SparseFixed.implementation("reference")
def fixed_reference(mech, q, k, v, plan: SparsePlan) -> torch.Tensor:
    n, l, c = plan.n_q, plan.stride, plan.summary
    own = _band(q, k, v, plan, half_width=l, same_block=True)
    if c == 0 or n <= l - c:  # no summary position before the query's block
        return own[0].to(q.dtype)
    # A2 outside the own block: every query tile sees the same summary columns.
    pos = torch.arange(n, device=q.device)
    summary_cols = pos[pos % l >= l - c]
    qi = blocks(n, l, q.device)
    i, j = qi[:, :, None], summary_cols[None, None, :]
    vis = (i >= 0) & (j // l < i // l if plan.causal else j // l != i // l)
    rest = attend_tiles(q, k, v, as_tiles(qi), as_tiles(summary_cols[None]), vis, keep=plan.keep)
    return merge([own, rest])[0].to(q.dtype)


@SparseStrided.implementation("flex", **flex_options())
def strided_flex(mech, q, k, v, plan: SparsePlan) -> torch.Tensor:
    l, causal = plan.stride, plan.causal

    def merged_head(b, h, i, j):  # A1 ∪ A2
        vis = ((i - j).abs() <= l) | ((i - j) % l == 0)
        return vis & (j <= i) if causal else vis

    return flex(q, k, v, merged_head, keep=plan.keep, need_lse=False)[0]


@SparseFixed.implementation("triton", **triton_options())
def fixed_triton(mech, q, k, v, plan: SparsePlan) -> torch.Tensor:
    """Own-block launch + summary-list launch(es) accumulated into it (kernels/sparse.py)."""
    from attn_zoo.kernels.sparse import fixed_attention

    return fixed_attention(q, k, v, plan)


@SparseFixed.implementation("flex", **flex_options())
def fixed_flex(mech, q, k, v, plan: SparsePlan) -> torch.Tensor:
    l, c, causal = plan.stride, plan.summary, plan.causal

    def merged_head(b, h, i, j):  # own block ∪ summary columns
        vis = (i // l == j // l) | (j % l >= l - c)
        return vis & (j <= i) if causal else vis

    return flex(q, k, v, merged_head, keep=plan.keep, need_lse=False)[0]
