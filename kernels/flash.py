"""The block-sparse flash-attention forward core: one online-softmax kernel.

For each query block the kernel walks the key blocks its :class:`BlockLayout`
lists, first those that need no element mask, then those that do, in float32
with the exp2 online softmax of the Triton tutorial 06-fused-attention. It
writes the output and each row's softmax statistics: the largest score m and
log2 of the sum of exp2(score - m), kept apart so that the backward recomputes
exp2(score - m) as exactly as the forward did, even beside a large bias such as
Reformer's self penalty (m + log2 l rounded to one float32 would lose ~1e-2 at
|m| ~ 1e5). A row that sees no key has m = -inf and output 0. Nothing N x N is
ever stored.

What a launch may add to plain attention (all decided at compile time):

* gathered rows: q and k/v read through index tensors (sorted or permuted
  orders), the output written back at the query's position or left in kernel
  order;
* the element masks of :mod:`attn_zoo.kernels.layout` (band, segment window, group
  equality);
* a bias on the pair i == j of positions (Reformer's self penalty, or -inf);
* the adaptive-span ramp, bias log m_z(x) (Sukhbaatar et al. 2019, Eq. 4-5);
* the Transformer-XL relative term (q_i + v) . W_R R_(i-j) (Dai et al. 2019,
  Sec. 3.3), with the content term (q_i + u) . k_j;
* key padding: keys whose position is marked padded are never seen;
* Reformer's duplicate correction (Kitaev et al. 2020, Eq. 7): a pair seen in
  N_ij hash rounds counts once, in the first round that shows it (the union the
  bias -log N_ij on every copy gives, without a count or a log per score);
* accumulation into a partial (out, lse) already in the output, merged by
  log-sum-exp, so a mechanism's parts need no extra N x D buffers.

A launch is described by a :class:`Part`; a mechanism is a list of parts merged
by log-sum-exp. Structure after Liger-Kernel: kernels (here, and the backward in
:mod:`attn_zoo.kernels.flash_backward`) -> launchers (:func:`forward`,
:func:`~attn_zoo.kernels.flash_backward.backward`) -> ``torch.autograd.Function``
(:func:`attn_zoo.kernels.autograd.attend`) -> one function per mechanism family
(``kernels/<family>.py``) -> registered impl.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from attn_zoo.kernels.layout import BIG, Band, BlockLayout, Window
from attn_zoo.kernels.tuning import Tile, default_tile, kind_of

LOG2E = 1.4426950408889634


@dataclass(frozen=True, eq=False)
class Ramp:
    """Adaptive span's soft mask m_z(x) = clamp((R + z_h - x) / R, 0, 1) as the
    bias log m (Sukhbaatar et al. 2019, Eq. 4-5); x = i - j, or |i - j| when
    ``symmetric`` (bidirectional)."""

    spans: torch.Tensor  # z_h [H], float32
    ramp: float  # R
    symmetric: bool


@dataclass(frozen=True, eq=False)
class Relative:
    """Transformer-XL scores (Dai et al. 2019, Sec. 3.3): (q_i + u) . k_j +
    (q_i + v) . table[i - j]; every visible pair has |i - j| <= max_dist."""

    u: torch.Tensor  # [H, D]
    v: torch.Tensor  # [H, D]
    table: torch.Tensor  # [H, 2 max_dist + 1, D]: W_R R_d for d = -max_dist .. max_dist
    max_dist: int


@dataclass(frozen=True, eq=False)
class Duplicates:
    """Reformer's Eq. 7 for the part of hash round ``round``: one code per round and
    original position, [B * H, R, N] int32, such that key j is visible to query i in
    round r exactly when 0 <= code[r, i] - code[r, j] <= ``reach``
    (:func:`attn_zoo.kernels.grouped.round_codes` folds each rule of
    :mod:`attn_zoo.grouped`, group and sorted place, into it). The part hides the
    pairs a round before ``round`` shows, so each pair of the rounds' union is
    counted once: sum_r sum_(j in P_i^r) exp(s_ij - log N_ij) = sum_(j in union)
    exp(s_ij), Eq. 7's softmax, with no N_ij to count or log to take per score."""

    codes: torch.Tensor
    reach: int
    round: int = 0

    def for_round(self, r: int) -> Duplicates:
        """The same codes for the part of round ``r`` (the kernel reads rounds 0..r-1)."""
        rounds = self.codes.shape[1]
        if not 0 <= r < rounds:
            raise ValueError(f"lsh: round {r} of {rounds}; accepted: 0 to {rounds - 1}")
        return dataclasses.replace(self, round=r)


@dataclass(frozen=True, eq=False)
class Part:
    """One launch of the core: the queries q (given at launch) against keys ``k``,
    values ``v`` [B, H, Nk, D] through ``layout``, with the modifiers a mechanism
    needs. A mechanism's parts see disjoint key sets and are merged by
    log-sum-exp (:func:`forward`).

    ``q_index`` [G|1, n_q] and ``k_index`` [G|1, n_k] (int32) read rows through a
    gather: the kernel runs over n_q = q_index.shape[-1] queries and writes row i
    at ``q_index[i]`` when ``scatter`` (else at i). ``groups`` = (q groups [G, n_q],
    k groups [G, n_k]) sorted along the kernel order. ``keep`` [B, positions of k]
    (bool, True = attend) hides padded keys. ``tile`` gives the launch's warps and
    stages (:mod:`attn_zoo.kernels.tuning`; its blocks are the layout's).
    ``frozen_memory``: keys before the query's window segment (``window.step * s``)
    are stop-gradient memories (Transformer-XL, Sec. 3.2; Compressive Transformer):
    they take part in the softmax and in dQ, and receive no dK/dV.
    """

    k: torch.Tensor
    v: torch.Tensor
    layout: BlockLayout
    band: Band = field(default_factory=Band)
    window: Window | None = None
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    scatter: bool = True
    groups: tuple[torch.Tensor, torch.Tensor] | None = None
    self_bias: float | None = None
    ramp: Ramp | None = None
    relative: Relative | None = None
    duplicates: Duplicates | None = None
    keep: torch.Tensor | None = None
    frozen_memory: bool = False
    tile: Tile | None = None  # warps and stages (None: the layout's default)

    def differentiable(self) -> list[torch.Tensor]:
        """The tensors a gradient can reach besides q: k, v, xl's u, v and table, the
        ramp's spans."""
        found = [self.k, self.v]
        if self.relative is not None:
            found += [self.relative.u, self.relative.v, self.relative.table]
        if self.ramp is not None:
            found.append(self.ramp.spans)
        return found


@triton.jit
def _seen_before(q_pos, k_pos, RCODE, n_pos, reach, DUP: tl.constexpr):
    """Whether key k_pos is visible to query q_pos in one of the DUP rounds before
    this part's (Eq. 7, :class:`Duplicates`): one code per side and round, and per
    pair one difference d and one unsigned minimum per round, then one compare:
    0 <= d <= reach in some round exactly when min over the rounds of d, read as
    unsigned (negative d wraps past every reach), is at most reach. The rounds unroll
    (DUP is compile-time): a loop nested in the key-block walk would keep the
    software pipeliner from multi-buffering K and V."""
    nearest = tl.full([q_pos.shape[0], k_pos.shape[0]], 0xFFFFFFFF, tl.uint32)
    for r in tl.static_range(DUP):
        step = tl.load(RCODE + r * n_pos + q_pos)[:, None] - tl.load(RCODE + r * n_pos + k_pos)
        nearest = tl.minimum(nearest, step.to(tl.uint32, bitcast=True))
    return nearest <= reach.to(tl.uint32)


@triton.jit
def _rel_rows(m_start, start, offset, rel_zero, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows of xl's padded distance table (:func:`padded_table`, distance d at row
    d + rel_zero) for the distances of a tile (the BLOCK_M + BLOCK_N - 1 it needs,
    padded to a power of two, 2 max(BLOCK_M, BLOCK_N)): column c holds d = d0 + c,
    and pair (a, b) reads column a - b + BLOCK_N - 1. Affine in c (no clamp), so the
    tile's rows load as one block the pipeliner can copy ahead."""
    width: tl.constexpr = 2 * BLOCK_M if BLOCK_M >= BLOCK_N else 2 * BLOCK_N
    return (m_start + offset) - start - (BLOCK_N - 1) + rel_zero + tl.arange(0, width)


@triton.jit
def _rel_table(REL, m_start, start, offset, rel_zero, srn, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REL_TERM: tl.constexpr):  # fmt: skip
    """xl's W_R R_d for the distances of a tile, [width, HEAD_DIM] (:func:`_rel_rows`):
    loaded once per tile, for the scores and, in the dQ pass, for their gradient
    (0 without the relative term)."""
    rel = 0
    if REL_TERM:
        row = _rel_rows(m_start, start, offset, rel_zero, BLOCK_M, BLOCK_N)
        rel = tl.load(REL + row[:, None] * srn + tl.arange(0, HEAD_DIM)[None, :])
    return rel


@triton.jit
def _program_ids(first_block, first_bh):
    """(block, batch-head) of this program: the launch's grid is a window of the whole
    one starting at (first_block, first_bh) (:func:`launches`)."""
    return tl.program_id(0) + first_block, (tl.program_id(1) + first_bh).to(tl.int64)


@triton.jit
def _program_scratch(SCRATCH, ROWS: tl.constexpr, COLS: tl.constexpr, TILES: tl.constexpr):
    """This program's TILES float32 tiles of the scratch buffer (:func:`launches`),
    each ROWS x 2 max(ROWS, COLS), where xl's distance scores are skewed: tile 0 for
    the scores (:func:`_skew`), tile 1 for the dQ pass's :func:`_unskew`. Indexed by
    the program's place in its launch, so the buffer is one launch's size."""
    width: tl.constexpr = 2 * ROWS if ROWS >= COLS else 2 * COLS
    slot = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    return SCRATCH + slot * (TILES * ROWS * width)


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):

    @triton.jit
    def _cta_barrier(x, ASM: tl.constexpr):
        """The interpreter runs one program at a time: a plain barrier, x unchanged."""
        tl.debug_barrier()
        return x

else:

    @triton.jit
    def _cta_barrier(x, ASM: tl.constexpr):
        """A barrier of every thread of the program (memory ordered at CTA scope),
        then the int32 x: a load whose address uses the result cannot move above it.
        ``ASM`` (16-bit inputs): bar.sync in inline asm rather than tl.debug_barrier,
        whose gpu.barrier makes Triton's software pipeliner leave the loop alone, so
        that K, V and the table rows stay multi-buffered; the asm has side effects,
        as Triton's stores do, so a store stays on its side. In float32 (IEEE dots on
        FMA units) the pipelined loop spills 2-5x more, so it keeps tl.debug_barrier."""
        if ASM:
            return tl.inline_asm_elementwise("bar.sync 0;\n\tmov.b32 $0, $1;", "=r,r",
                                             [tl.full([], x, tl.int32)], dtype=tl.int32,
                                             is_pure=False, pack=1)  # fmt: skip
        tl.debug_barrier()
        return x


@triton.jit
def _skew(s, SCRATCH, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FENCE: tl.constexpr,
          ASM: tl.constexpr):  # fmt: skip
    """t[a, b] = s[a, a - b + BLOCK_N - 1]: each row of the distance scores
    [BLOCK_M, width] read at its own diagonal (Transformer-XL's relative shift, Dai et
    al. 2019, App. B), as a shifted load from the program's scratch tile 0: s is
    stored once and read back skewed. A register gather (tl.gather) costs ~350
    shuffles and selects per tile and spills the backward (the compile report).
    A barrier (:func:`_cta_barrier`) between store and load; ``FENCE``, one before
    the store too (no other barrier separates it from the previous tile's reads)."""
    width: tl.constexpr = 2 * BLOCK_M if BLOCK_M >= BLOCK_N else 2 * BLOCK_N
    a = tl.arange(0, BLOCK_M)[:, None]
    if FENCE:
        _cta_barrier(0, ASM)  # every thread has read the previous tile
    tl.store(SCRATCH + a * width + tl.arange(0, width)[None, :], s)
    zero = _cta_barrier(0, ASM)
    return tl.load(SCRATCH + zero + a * width + (a + BLOCK_N - 1) - tl.arange(0, BLOCK_N)[None, :])


@triton.jit
def _unskew(ds, SCRATCH, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """The transpose of :func:`_skew`'s pick: wide[a, c] = ds[a, a + BLOCK_N - 1 - c]
    where that is a column of ds, else 0 ([BLOCK_M, width] as :func:`_rel_rows`), in
    ds's dtype, through the program's scratch tile 1. Called after :func:`_skew` of
    the same step (no fence: the skew's barrier follows this tile's previous reads,
    and this barrier precedes the next skew's store)."""
    width: tl.constexpr = 2 * BLOCK_M if BLOCK_M >= BLOCK_N else 2 * BLOCK_N
    TILE = (SCRATCH + BLOCK_M * width).to(tl.pointer_type(ds.dtype))
    a = tl.arange(0, BLOCK_M)[:, None]
    b = a + BLOCK_N - 1 - tl.arange(0, width)[None, :]
    tl.store(TILE + a * width + tl.arange(0, BLOCK_N)[None, :], ds)
    zero = _cta_barrier(0, ASM)
    return tl.load(TILE + zero + a * width + b, mask=(b >= 0) & (b < BLOCK_N), other=0.0)


@triton.jit
def _ramp_distance(offs_m, offs_n, offset, SYMMETRIC: tl.constexpr):
    """x of the adaptive-span ramp: i - j, or |i - j| bidirectionally."""
    x = ((offs_m[:, None] + offset) - offs_n[None, :]).to(tl.float32)
    if SYMMETRIC:
        x = tl.abs(x)
    return x


@triton.jit
def _head(Q, K, V, QIDX, KIDX, QGRP, KGRP, REL, RCODE, KEEP, pid_bh,
          sqb, sqh, skb, skh, svb, svh, srh, H, n_q, n_k, n_indexed, n_grouped, dup_stride,
          keep_stride):  # fmt: skip
    """Every input pointer moved to batch/head ``pid_bh`` (int64: b * stride passes
    2^31 elements on large inputs; offsets within one head stay 32-bit)."""
    b = pid_bh // H
    h = pid_bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    QIDX += (pid_bh % n_indexed) * n_q
    KIDX += (pid_bh % n_indexed) * n_k
    QGRP += (pid_bh % n_grouped) * n_q
    KGRP += (pid_bh % n_grouped) * n_k
    REL += h * srh
    RCODE += pid_bh * dup_stride
    KEEP += b * keep_stride
    return Q, K, V, QIDX, KIDX, QGRP, KGRP, REL, RCODE, KEEP, b, h


@triton.jit
def _widen(sqm, skn, svn, som, WIDE: tl.constexpr):
    """The row strides as int64 when a row's offset within a head can pass 2^31
    elements (``WIDE``, decided at launch: :func:`wide_offsets`), so that
    position * stride does not overflow; int32 otherwise (fewer registers)."""
    if WIDE:
        return sqm.to(tl.int64), skn.to(tl.int64), svn.to(tl.int64), som.to(tl.int64)
    return sqm, skn, svn, som


@triton.jit
def _load_queries(Q, QIDX, QGRP, U, VB, h, offs_m, rows_in, sqm, HEAD_DIM: tl.constexpr,
                  GATHER_Q: tl.constexpr, GROUPS: tl.constexpr,
                  REL_TERM: tl.constexpr):  # fmt: skip
    """A query block: (q, q for the relative term, positions, groups). For xl, q
    is q + u and the second q + v (Dai et al. 2019, Sec. 3.3)."""
    offs_d = tl.arange(0, HEAD_DIM)
    if GATHER_Q:
        q_pos = tl.load(QIDX + offs_m, mask=rows_in, other=0)
    else:
        q_pos = offs_m
    q = tl.load(Q + q_pos[:, None] * sqm + offs_d[None, :], mask=rows_in[:, None], other=0.0)
    qv = q
    if REL_TERM:
        qv = (q.to(tl.float32) + tl.load(VB + h * HEAD_DIM + offs_d)[None, :]).to(q.dtype)
        q = (q.to(tl.float32) + tl.load(U + h * HEAD_DIM + offs_d)[None, :]).to(q.dtype)
    q_grp = offs_m
    if GROUPS:
        q_grp = tl.load(QGRP + offs_m, mask=rows_in, other=-2)
    return q, qv, q_pos, q_grp


@triton.jit
def _load_keys(K, V, KIDX, offs_n, in_range, skn, svn, HEAD_DIM: tl.constexpr,
               MASKED: tl.constexpr, GATHER_K: tl.constexpr):  # fmt: skip
    """A key block: (positions, k^T [HEAD_DIM, BLOCK_N], v [BLOCK_N, HEAD_DIM])."""
    offs_d = tl.arange(0, HEAD_DIM)
    if GATHER_K:
        k_pos = tl.load(KIDX + offs_n, mask=in_range, other=0)
    else:
        k_pos = offs_n
    k_ptrs = K + k_pos[None, :] * skn + offs_d[:, None]
    v_ptrs = V + k_pos[:, None] * svn + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=in_range[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k_pos, k, v


@triton.jit
def _block_list(FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT, lay, max_full, max_partial,
                masked: tl.constexpr):  # fmt: skip
    """The blocks row ``lay`` of the layout visits: full ones, or those needing the
    mask; with the first of them (a run's start)."""
    if masked == 0:
        blocks = FULL + lay * max_full
        return blocks, tl.load(FULL_COUNT + lay), tl.load(blocks)
    blocks = PARTIAL + lay * max_partial
    return blocks, tl.load(PARTIAL_COUNT + lay), tl.load(blocks)


@triton.jit
def _block_at(blocks, first, t, RUN: tl.constexpr):
    """The t-th block of a list: ``first + t`` in a contiguous run (no load in the
    loop, so the pipeliner can issue the next tile's loads early), else loaded."""
    if RUN:
        return first + t
    return tl.load(blocks + t)


@triton.jit
def _step_start(blocks, first, t, RUN: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr):
    """The first index of step t when each listed block of BLOCK indices is walked
    STEP at a time (STEP divides BLOCK; equal, it is the block's start)."""
    block = _block_at(blocks, first, t // (BLOCK // STEP), RUN)
    return block * BLOCK + (t % (BLOCK // STEP)) * STEP


@triton.jit
def _scores(
    q, qv, k, q_pos, offs_m, q_grp, m_start, k_pos, offs_n, in_range, start,
    KGRP, rel, SCRATCH, SPANS, RCODE, KEEP,
    lo, hi, offset, seg_len, seg_step, win_lo, win_hi, self_bias, ramp, h,
    qk_scale, n_pos, dup_reach,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, WINDOW: tl.constexpr, GROUPS: tl.constexpr, SELF: tl.constexpr,
    RAMP: tl.constexpr, SYMMETRIC: tl.constexpr, REL_TERM: tl.constexpr, DUP: tl.constexpr,
    PADDED: tl.constexpr, PRECISION: tl.constexpr, FENCE: tl.constexpr,
):  # fmt: skip
    """The scores of one tile before the softmax scale: q . k plus every bias divided
    by ``qk_scale`` (= log2(e) / sqrt(d)), -inf where a pair is not visible, so that
    the softmax weight is exp2(score * qk_scale - m), one FMA and an exp2 per score
    (the scale is folded into the exponent's argument, not a separate multiply).
    ``k`` is k^T [HEAD_DIM, BLOCK_N]; ``rel`` xl's table rows (:func:`_rel_table`),
    skewed through ``SCRATCH`` (``FENCE``: see :func:`_skew`).
    The forward and both backward passes score tiles here, so they cannot disagree."""
    qk = tl.dot(q, k, input_precision=PRECISION)
    per_log2 = 1.0 / qk_scale  # a bias b in log2 units is b * per_log2 in these
    if REL_TERM:
        # (q + v) . R_d for the distances of the tile (rel, from _rel_table), then
        # each row picks its own diagonal
        s = tl.dot(qv, tl.trans(rel), input_precision=PRECISION)
        qk += _skew(s, SCRATCH, BLOCK_M, BLOCK_N, FENCE, PRECISION is None)
    if DUP:  # a pair an earlier round shows was counted there
        qk = tl.where(_seen_before(q_pos, k_pos, RCODE, n_pos, dup_reach, DUP), float("-inf"),
                      qk)  # fmt: skip
    if PADDED:  # key padding, in every block (the layout does not know it)
        kept = tl.load(KEEP + k_pos, mask=in_range, other=0)
        qk = tl.where(kept[None, :] != 0, qk, float("-inf"))
    if MASKED:
        diff = (offs_m[:, None] + offset) - offs_n[None, :]
        visible = (diff >= lo) & (diff <= hi) & in_range[None, :]
        if WINDOW:
            seg = (offs_m // seg_len) * seg_step
            visible &= offs_n[None, :] >= seg[:, None] + win_lo
            visible &= offs_n[None, :] <= seg[:, None] + win_hi
        if GROUPS:
            k_grp = tl.load(KGRP + offs_n, mask=in_range, other=-1)
            visible &= q_grp[:, None] == k_grp[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        if SELF:
            qk = tl.where(q_pos[:, None] == k_pos[None, :], qk + self_bias, qk)
        if RAMP:
            x = _ramp_distance(offs_m, offs_n, offset, SYMMETRIC)
            reach = (ramp + tl.load(SPANS + h)) / ramp  # (R + z) / R, once per tile
            m = tl.minimum(tl.maximum(reach - x * (1.0 / ramp), 0.0), 1.0)  # no division
            qk = tl.where(m > 0.0, qk + tl.math.log2(tl.maximum(m, 1e-30)) * per_log2,
                          float("-inf"))  # fmt: skip
    return qk


@triton.jit
def _flash_fwd(
    O, MAX, LOGSUM, SCRATCH, first_block, first_bh,
    Q, K, V, QIDX, KIDX, QGRP, KGRP, U, VB, REL, SPANS, RCODE, KEEP,
    FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, srh, srn,
    H, n_q, n_k, n_out, n_layouts, n_indexed, n_grouped, max_full, max_partial,
    lo, hi, offset, seg_len, seg_step, win_lo, win_hi, self_bias, ramp, rel_zero, qk_scale,
    n_pos, dup_reach, dup_stride, keep_stride,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, SCATTER_O: tl.constexpr,
    WINDOW: tl.constexpr, GROUPS: tl.constexpr, SELF: tl.constexpr, RAMP: tl.constexpr,
    SYMMETRIC: tl.constexpr, REL_TERM: tl.constexpr, DUP: tl.constexpr, PADDED: tl.constexpr,
    PRECISION: tl.constexpr, RUNS: tl.constexpr, WIDE: tl.constexpr, STEP_N: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = _program_ids(first_block, first_bh)
    Q, K, V, QIDX, KIDX, QGRP, KGRP, REL, RCODE, KEEP, b, h = _head(
        Q, K, V, QIDX, KIDX, QGRP, KGRP, REL, RCODE, KEEP, pid_bh,
        sqb, sqh, skb, skh, svb, svh, srh, H, n_q, n_k, n_indexed, n_grouped, dup_stride,
        keep_stride)  # fmt: skip
    sqm, skn, svn, som = _widen(sqm, skn, svn, som, WIDE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_in = offs_m < n_q
    q, qv, q_pos, q_grp = _load_queries(Q, QIDX, QGRP, U, VB, h, offs_m, rows_in, sqm,
                                        HEAD_DIM, GATHER_Q, GROUPS, REL_TERM)  # fmt: skip
    SCRATCH = _program_scratch(SCRATCH, BLOCK_M, STEP_N, 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lay = (pid_bh % n_layouts) * tl.cdiv(n_q, BLOCK_M) + pid_m
    for masked in tl.static_range(2):  # the full blocks, then those needing the mask
        blocks, count, first = _block_list(FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT, lay,
                                           max_full, max_partial, masked)  # fmt: skip
        for t in range(0, count * (BLOCK_N // STEP_N)):
            start = _step_start(blocks, first, t, RUNS and masked == 0, BLOCK_N, STEP_N)
            offs_n = start + tl.arange(0, STEP_N)
            in_range = offs_n < n_k
            k_pos, k, v = _load_keys(K, V, KIDX, offs_n, in_range, skn, svn, HEAD_DIM,
                                     masked == 1, GATHER_K)  # fmt: skip
            rel = _rel_table(REL, pid_m * BLOCK_M, start, offset, rel_zero, srn, HEAD_DIM,
                             BLOCK_M, STEP_N, REL_TERM)  # fmt: skip
            qk = _scores(
                q, qv, k, q_pos, offs_m, q_grp, pid_m * BLOCK_M, k_pos, offs_n, in_range, start,
                KGRP, rel, SCRATCH, SPANS, RCODE, KEEP,
                lo, hi, offset, seg_len, seg_step, win_lo, win_hi, self_bias, ramp, h,
                qk_scale, n_pos, dup_reach,
                HEAD_DIM, BLOCK_M, STEP_N, masked == 1, WINDOW, GROUPS, SELF, RAMP, SYMMETRIC,
                REL_TERM, DUP, PADDED, PRECISION, True,
            )  # fmt: skip
            # the online softmax, in the exp2 domain (m_i in scaled units)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_rows = q_pos if SCATTER_O else offs_m
    o_ptrs = O + b * sob + h * soh + o_rows[:, None] * som + offs_d[None, :]
    stats = pid_bh * n_out + o_rows
    if ACCUMULATE:  # merge with the partial result already there, by log-sum-exp
        prev = tl.load(o_ptrs, mask=rows_in[:, None], other=0.0).to(tl.float32)
        prev_m = tl.load(MAX + stats, mask=rows_in, other=float("-inf"))
        prev_l = tl.math.exp2(tl.load(LOGSUM + stats, mask=rows_in, other=0.0))
        top = tl.maximum(prev_m, m_i)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        w_prev = tl.math.exp2(prev_m - top_safe) * prev_l
        w_new = tl.math.exp2(m_i - top_safe) * l_i
        l_i = w_prev + w_new
        empty = l_i == 0.0
        total = tl.where(empty, 1.0, l_i)
        out = (prev * (w_prev / total)[:, None]) + out * (w_new / total)[:, None]
        m_i = top
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rows_in[:, None])
    tl.store(MAX + stats, m_i, mask=rows_in)
    tl.store(LOGSUM + stats, tl.math.log2(tl.where(empty, 1.0, l_i)), mask=rows_in)


def table_pad(block_m: int, block_n: int) -> int:
    """Zero rows on each side of xl's table for a layout of block_m x block_n blocks.
    A tile of BM rows from m0 and S keys from s, inside a listed block pair (forward
    steps and backward programs: BM, S <= B = max(block_m, block_n)), reads rows
    rel_zero + m0 - s - (S - 1) + c for c < 2 max(BM, S) (:func:`_rel_rows`). The
    block pair has a visible pair, |i - j| <= max_dist, so m0 - s lies within
    max_dist + block_m + block_n of 0 and the rows stay in the padded table,
    [0, 2 max_dist + 2 pad], when pad = 3B. (2B let a 32-key step of a 64 x 64 block
    read 30 rows past its end, and the dQ pass add to them.)"""
    return 3 * max(block_m, block_n)


def padded_table(relative: Relative, dtype: torch.dtype, pad: int) -> torch.Tensor:
    """xl's table in the launch's dtype with ``pad`` zero rows on each side: a tile's
    distances reach past +-max_dist only at pairs the mask hides, so the kernel reads
    its rows without a clamp."""
    return torch.nn.functional.pad(relative.table.to(dtype), (0, 0, pad, pad)).contiguous()


#: The most bytes of xl's skew scratch one launch takes (:func:`launches`): 2,048
#: forward programs of 64 x 64 (32 KiB each), several waves of an H100's 132 SMs.
SCRATCH_BYTES = 64 * 2**20


Grid = tuple[int, int]


def launches(q: torch.Tensor, part: Part, grid: Grid, rows: int, cols: int,
             tiles: int = 1) -> Iterator[tuple[Grid, Grid, torch.Tensor]]:  # fmt: skip
    """The launches that cover ``grid`` (blocks, batch-heads): (their grid, their first
    (block, batch-head), scratch). xl's skew takes ``tiles`` float32 tiles of
    rows x 2 max(rows, cols) per program (:func:`_program_scratch`: 1 for the forward
    and dK/dV, 2 for dQ); one launch holds at most :data:`SCRATCH_BYTES` of them, and
    the launches, in order on one stream, share one buffer, so the scratch stays the
    same size whatever N and the heads (64 sequences of 16 heads of 8,192 tokens would
    otherwise take 4 GiB in the forward). Without xl: one launch, a placeholder."""
    if part.relative is None:
        yield grid, (0, 0), torch.empty(1, device=q.device, dtype=torch.float32)
        return
    per_program = tiles * rows * 2 * max(rows, cols)  # float32 elements
    programs = max(1, SCRATCH_BYTES // (4 * per_program))
    blocks = min(grid[0], programs)
    heads = max(1, programs // grid[0]) if blocks == grid[0] else 1
    scratch = torch.empty(blocks * min(heads, grid[1]) * per_program, device=q.device,
                          dtype=torch.float32)  # fmt: skip
    for first_bh in range(0, grid[1], heads):
        for first_block in range(0, grid[0], blocks):
            shape = (min(blocks, grid[0] - first_block), min(heads, grid[1] - first_bh))
            yield shape, (first_block, first_bh), scratch


def new_output(q: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Allocates the kernels' outputs and gradient buffers (tests swap in NaN-filled
    ones, so a row a kernel forgets to write cannot pass)."""
    return torch.empty(shape, device=q.device, dtype=dtype)


@dataclass
class Launch:
    """The arguments every kernel of the core shares, for one part: ``args`` from Q
    to keep_stride in the kernels' order, ``flags`` the compile-time ones."""

    args: list
    flags: dict
    n_q: int
    n_k: int
    n_out: int
    tile: Tile
    rel_pad: int  # rows of xl's padded table before distance -max_dist


def launch(q: torch.Tensor, part: Part, out: torch.Tensor, layout: BlockLayout | None = None):
    """:class:`Launch` for ``part`` with output rows shaped like ``out``; ``layout``
    replaces the part's (the backward's key-major lists)."""
    heads, dim = q.shape[1], q.shape[3]
    layout = layout if layout is not None else part.layout
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, part.k, part.v))
    n_q = q.shape[2] if part.q_index is None else part.q_index.shape[-1]
    n_k = k.shape[2] if part.k_index is None else part.k_index.shape[-1]
    dummy = torch.empty(1, device=q.device, dtype=torch.int32)
    keep = part.keep.to(torch.int8).contiguous() if part.keep is not None else dummy
    relative, ramp, dup, groups = part.relative, part.ramp, part.duplicates, part.groups
    pad = table_pad(layout.block_m, layout.block_n)
    rel_table = padded_table(relative, q.dtype, pad) if relative is not None else q
    win = part.window if part.window is not None else Window(1, 0, -BIG, BIG)
    band = part.band
    args = [
        q, k, v,
        part.q_index if part.q_index is not None else dummy,
        part.k_index if part.k_index is not None else dummy,
        *(groups if groups is not None else (dummy, dummy)),
        *((relative.u.float().contiguous(), relative.v.float().contiguous()) if relative
          else (q, q)), rel_table,
        ramp.spans.float().contiguous() if ramp is not None else q,
        dup.codes if dup is not None else dummy,
        keep,
        layout.full, layout.full_count, layout.partial, layout.partial_count,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        rel_table.stride(0), rel_table.stride(1),
        heads, n_q, n_k, out.shape[2], layout.full.shape[0],
        next((x.shape[0] for x in (part.q_index, part.k_index) if x is not None), 1),
        groups[0].shape[0] if groups is not None else 1,
        layout.full.shape[2], layout.partial.shape[2],
        band.lo, band.hi, band.offset, win.seg_len, win.step, win.lo, win.hi,
        (part.self_bias if part.self_bias is not None else 0.0) * dim**0.5,  # / the scale
        ramp.ramp if ramp is not None else 1.0,
        relative.max_dist + pad if relative is not None else 0, dim**-0.5 * LOG2E,
        *((dup.codes.shape[2], dup.reach, dup.codes.stride(0)) if dup is not None
          else (0, 1, 0)),
        keep.stride(0) if part.keep is not None else 0,
    ]  # fmt: skip
    flags = dict(
        HEAD_DIM=dim, BLOCK_M=layout.block_m, BLOCK_N=layout.block_n,
        GATHER_Q=part.q_index is not None, GATHER_K=part.k_index is not None,
        SCATTER_O=part.scatter and part.q_index is not None, WINDOW=part.window is not None,
        GROUPS=groups is not None, SELF=part.self_bias is not None, RAMP=ramp is not None,
        SYMMETRIC=bool(ramp is not None and ramp.symmetric), REL_TERM=relative is not None,
        DUP=dup.round if dup is not None else 0, PADDED=part.keep is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else None, RUNS=layout.full_runs,
        WIDE=wide_offsets(q, k, v, out),
    )  # fmt: skip
    return Launch(args, flags, n_q, n_k, out.shape[2], part_tile(q, part),
                  pad if relative is not None else 0)  # fmt: skip


#: Offsets within one head stay int32 below this many elements.
OFFSET_LIMIT = 2**31


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether a row offset within one head of any [B, H, N, D] tensor can reach
    :data:`OFFSET_LIMIT` elements (a transposed [B, N, H, D] view at N H D >= 2^31,
    such as N = 2^20 tokens of 16 heads of 128)."""
    return any((t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) >= OFFSET_LIMIT
               for t in tensors if t.dim() == 4)  # fmt: skip


def part_tile(q: torch.Tensor, part: Part) -> Tile:
    """The part's tile, or the default for its kind with the layout's blocks."""
    if part.tile is not None:
        return part.tile
    kind = kind_of(part.relative is not None, part.duplicates is not None)
    tile = default_tile(q.shape[-1], q.dtype, kind)
    return Tile(part.layout.block_m, part.layout.block_n, tile.warps, tile.stages)


def output_rows(q: torch.Tensor, part: Part) -> int:
    """Rows of the output: q's positions, or the kernel order when not scattered."""
    return q.shape[2] if part.scatter or part.q_index is None else part.q_index.shape[-1]


def forward_with_stats(q: torch.Tensor, parts: Sequence[Part]):
    """Run the parts, each merged into the last by log-sum-exp. q [B, H, Nq, D].
    Returns (out in q's dtype, row max m and log2 l [B, H, n_out] float32)."""
    batch, heads, _, dim = q.shape
    n_out = output_rows(q, parts[0])
    out = new_output(q, (batch, heads, n_out, dim), q.dtype)
    row_max, row_logsum = (new_output(q, (batch, heads, n_out), torch.float32) for _ in range(2))
    for i, part in enumerate(parts):
        run = launch(q, part, out)
        grid = (triton.cdiv(run.n_q, part.layout.block_m), batch * heads)
        for window, first, scratch in launches(q, part, grid, part.layout.block_m,
                                               run.tile.step):  # fmt: skip
            _flash_fwd[window](out, row_max, row_logsum, scratch, *first, *run.args,
                               **run.flags, STEP_N=run.tile.step, ACCUMULATE=i > 0,
                               num_warps=run.tile.warps, num_stages=run.tile.stages)  # fmt: skip
    return out, row_max, row_logsum


def row_lse(row_max: torch.Tensor, row_logsum: torch.Tensor) -> torch.Tensor:
    """The natural log-sum-exp of each row from its statistics (-inf: no key)."""
    return (row_max + row_logsum) / LOG2E


def forward(q: torch.Tensor, parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse [B, H, n_out] float32, natural log) of the parts, no autograd."""
    out, row_max, row_logsum = forward_with_stats(q, parts)
    return out, row_lse(row_max, row_logsum)


def flash_attention(q, k, v, layout: BlockLayout, band: Band | None = None,
                    window: Window | None = None,
                    **modifiers) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One forward launch (no autograd): :func:`forward` of one :class:`Part`."""
    return forward(
        q, [Part(k, v, layout, band if band is not None else Band(), window, **modifiers)]
    )
