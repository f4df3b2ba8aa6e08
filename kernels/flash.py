"""The block-sparse flash-attention forward core (one online-softmax kernel).

For each query block the kernel walks two lists of key blocks: blocks that
need no element mask (every pair visible) and blocks that do (a band edge or
the ragged end of the sequence). Element visibility is a band on the
position difference,

    lo <= (i + offset) - j <= hi,

which covers causal attention with an offset (keys longer than queries,
memories), sliding windows and full attention. Accumulation is in float32;
the kernel returns the output and the per-row log-sum-exp (natural log), -inf
for a row that sees no key, whose output is 0. Nothing N x N is ever stored.

Structure after the Triton tutorial 06-fused-attention: kernel -> launcher
(:func:`block_sparse_attention`) -> layout builder (:func:`band_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BIG = 1 << 40  # an unbounded band edge


@dataclass(frozen=True)
class BlockLayout:
    """Per query block, the key blocks to visit: ``full`` [n_qb, max] need no
    element mask, ``partial`` [n_qb, max] do; -1 pads; counts per row."""

    block_m: int
    block_n: int
    full: torch.Tensor
    full_count: torch.Tensor
    partial: torch.Tensor
    partial_count: torch.Tensor

    @property
    def blocks_visited(self) -> int:
        return int(self.full_count.sum() + self.partial_count.sum())


def _pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_qb, n_kb] bool -> (indices [n_qb, max(1, widest)] padded with -1, counts)."""
    counts = mask.sum(1).to(torch.int32)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    idx = torch.where(torch.arange(width, device=mask.device)[None, :] < counts[:, None], order, -1)
    return idx.to(torch.int32).contiguous(), counts.contiguous()


def band_layout(
    n_q: int, n_k: int, lo: int, hi: int, offset: int, block_m: int = 64, block_n: int = 64,
    device=None,
) -> BlockLayout:  # fmt: skip
    """Classify every (query block, key block) for the band lo <= i + offset - j <= hi."""
    qb = torch.arange(-(-n_q // block_m), device=device)
    kb = torch.arange(-(-n_k // block_n), device=device)
    i_lo, i_hi = qb * block_m + offset, torch.clamp((qb + 1) * block_m, max=n_q) - 1 + offset
    j_lo, j_hi = kb * block_n, torch.clamp((kb + 1) * block_n, max=n_k) - 1
    d_min = i_lo[:, None] - j_hi[None, :]
    d_max = i_hi[:, None] - j_lo[None, :]
    touched = (d_max >= lo) & (d_min <= hi)
    inside = (d_min >= lo) & (d_max <= hi)
    ragged = (((qb + 1) * block_m > n_q)[:, None]) | (((kb + 1) * block_n > n_k)[None, :])
    full = touched & inside & ~ragged
    return BlockLayout(block_m, block_n, *_pack(full), *_pack(touched & ~full))


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, n_k, lo, hi, offset,
                  qk_scale, MASKED: tl.constexpr):  # fmt: skip
    """One key block of the online softmax (exp2 domain)."""
    if MASKED:
        k = tl.load(k_ptrs, mask=offs_n[None, :] < n_k, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < n_k, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, k) * qk_scale
    if MASKED:
        diff = (offs_m[:, None] + offset) - offs_n[None, :]
        visible = (diff >= lo) & (diff <= hi) & (offs_n[None, :] < n_k)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, LSE,
    FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    H, n_q, n_k, lo, hi, offset, qk_scale, max_full, max_partial,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < n_q, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for t in range(0, tl.load(FULL_COUNT + pid_m)):
        start = tl.load(FULL + pid_m * max_full + t) * BLOCK_N
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[None, :] * skn + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :]
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, n_k,
                                      lo, hi, offset, qk_scale, MASKED=False)  # fmt: skip
    for t in range(0, tl.load(PARTIAL_COUNT + pid_m)):
        start = tl.load(PARTIAL + pid_m * max_partial + t) * BLOCK_N
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[None, :] * skn + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :]
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, n_k,
                                      lo, hi, offset, qk_scale, MASKED=True)  # fmt: skip
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634
    )
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < n_q)
    tl.store(LSE + pid_bh * n_q + offs_m, lse, mask=offs_m < n_q)


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
    lo: int = -BIG, hi: int = BIG, offset: int = 0, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the core: q [B, H, Nq, D], k/v [B, H, Nk, D] (last dim contiguous).
    Returns (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] float32)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(n_q, layout.block_m), b * h)
    _block_sparse_fwd[grid](
        q, k, v, out, lse,
        layout.full, layout.full_count, layout.partial, layout.partial_count,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, n_q, n_k, lo, hi, offset, d**-0.5 * LOG2E,
        layout.full.shape[1], layout.partial.shape[1],
        HEAD_DIM=d, BLOCK_M=layout.block_m, BLOCK_N=layout.block_n,
    )  # fmt: skip
    return out, lse
