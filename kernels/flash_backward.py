"""The backward pass of the flash core, after FlashAttention-2 (Dao 2023, Sec. 3.1
and Algorithm 2).

With O and the log-sum-exp L saved by the forward, D_i = rowsum(dO_i * O_i) once
per row (``_row_dots``, one pass over O and dO), and every tile recomputes
P = exp(S - L) from the same :func:`~attn_zoo.kernels.flash._scores` as the forward
(every modifier included):

* ``_flash_bwd_dq``, one program per query block over the key blocks its layout
  lists: dS = P * (dO V^T - D) and dQ = scale * dS K. With a relative term the
  same dS gives the query features' gradient, dF = scale * dS G (for
  Transformer-XL, autograd carries it on to q, v and W_R); for adaptive span the
  gradient of the ramp's spans z_h: d log m / dz = 1 / (R m) on the ramp (Eq. 4),
  and dS = P (dP - D) with P = exp(S - L) m, so each ramp pair adds
  exp(S - L) (dP - D) / R: m cancels, no division per pair.
* ``_flash_bwd_dkdv``, one program per key block over the query blocks that see
  it (:attr:`~attn_zoo.kernels.layout.BlockLayout.by_key`): dV = P^T dO and
  dK = scale * dS^T Q.

A mechanism of several parts merged by log-sum-exp needs nothing more: with the
final O and L, each part's P is already its share of the merged softmax, so
each part runs these two kernels unchanged. A gradient reaching L itself (a
caller that merges more keys later) enters as D - dL. Each kernel puts its
rows at their positions in the gradient itself, the parts after the first adding
to it in L2 (:func:`puts`); only rows whose positions repeat within a launch (a
token in several clusters) go through a kernel-order buffer and ``scatter_add``.
Nothing N x N is stored; beyond q, k, v, o and the gradients the extra memory
is D (one float per row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from attn_zoo.kernels import flash
from attn_zoo.kernels.flash import (
    Part,
    _block_list,
    _head,
    _key_features,
    _key_interval,
    _load_keys,
    _load_queries,
    _scores,
    _step_start,
    _widen,
    launch,
)
from attn_zoo.kernels.layout import Window, cached_layout
from attn_zoo.kernels.tuning import backward_tile_for

LN2 = tl.constexpr(0.6931471805599453)  # the log2-unit scale back to natural-log scores


@triton.jit
def _row_dots(O, DO, DLSE, DELTA, n, sob, soh, som, sdb, sdh, sdm, H,
              HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, DLSE_IN: tl.constexpr):  # fmt: skip
    """D_i = rowsum(dO_i * O_i) (FlashAttention-2, Algorithm 2, line 4) of ROWS rows of
    one (batch, head), in float32, less dL_i when a gradient reaches the log-sum-exp
    (``DLSE_IN``): one pass over O and dO, no float32 copies of either."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    inside = rows < n
    cols = tl.arange(0, HEAD_DIM)[None, :]
    at = rows.to(tl.int64)[:, None]  # n * D may pass 2^31 elements
    o = tl.load(O + (bh // H) * sob + (bh % H) * soh + at * som + cols, mask=inside[:, None],
                other=0.0)  # fmt: skip
    do = tl.load(DO + (bh // H) * sdb + (bh % H) * sdh + at * sdm + cols, mask=inside[:, None],
                 other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if DLSE_IN:
        delta -= tl.load(DLSE + bh * n + rows, mask=inside, other=0.0)
    tl.store(DELTA + bh * n + rows, delta, mask=inside)


def row_dots(out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """D = rowsum(dO * O) - dL, [B, H, n] float32 (:func:`_row_dots`), for ``out`` and
    ``dout`` [B, H, n, D] with unit stride along D."""
    batch, heads, n, dim = out.shape
    delta = torch.empty(batch, heads, n, device=out.device, dtype=torch.float32)
    dlse = dlse.float().contiguous() if dlse is not None else delta
    rows = 64
    _row_dots[(triton.cdiv(n, rows), batch * heads)](
        out, dout, dlse, delta, n, *out.stride()[:3], *dout.stride()[:3], heads,
        HEAD_DIM=dim, ROWS=rows, DLSE_IN=dlse is not delta)  # fmt: skip
    return delta


@triton.jit
def _row_grads(DO, MAX, LOGSUM, DELTA, pid_bh, b, h, o_rows, rows_in, sob, soh, som, n_out,
               HEAD_DIM: tl.constexpr):  # fmt: skip
    """dO, the softmax statistics m (+inf for rows outside or with no key, so
    P = 0) and log2 l, and D of a query block, read at its output rows."""
    do = tl.load(DO + b * sob + h * soh + o_rows[:, None] * som + tl.arange(0, HEAD_DIM)[None, :],
                 mask=rows_in[:, None], other=0.0)  # fmt: skip
    stats = pid_bh * n_out + o_rows
    row_max = tl.load(MAX + stats, mask=rows_in, other=float("-inf"))
    row_max = tl.where(row_max == float("-inf"), float("inf"), row_max)
    logsum = tl.load(LOGSUM + stats, mask=rows_in, other=0.0)
    delta = tl.load(DELTA + stats, mask=rows_in, other=0.0)
    return do, row_max, logsum, delta


@triton.jit
def _position(INDEX, offs, inside, GATHER: tl.constexpr, WIDE: tl.constexpr):
    """The positions of kernel rows ``offs``: read from their index (``GATHER``), again
    for the dK/dV pass's epilogue rather than held in registers through the walks
    beside its two accumulators (held, they cost lsh at head_dim 128 an 80-byte spill
    with Triton 3.9), int64 when offsets may pass 2^31 elements (``WIDE``:
    :func:`~attn_zoo.kernels.flash._widen`)."""
    at = offs
    if GATHER:
        tl.debug_barrier()  # a load past a barrier is not the same as one before the walks
        at = tl.load(INDEX + offs, mask=inside, other=0)
    if WIDE:
        at = at.to(tl.int64)
    return at


@triton.jit
def _put(rows, value, inside, ADD: tl.constexpr):
    """Store gradient rows, or add them to the rows an earlier launch put there
    (``ADD``). A launch puts each row once (its rows' positions are distinct), so the
    adds of one launch never meet and launches run in stream order: the sum is the same
    every run. The add is a reduction in L2 (RED, no value back): no registers beyond
    the rows, no kernel-order buffer and host ``scatter_add`` after the launch."""
    if ADD:
        tl.atomic_add(rows, value, mask=inside, sem="relaxed")
    else:
        tl.store(rows, value, mask=inside)


@triton.jit
def _flash_bwd_dq(
    DO, MAX, LOGSUM, DELTA, DQ, DQF, DSPANS,
    Q, K, V, QIDX, KIDX, GLO, GHI, QF, KF, SPANS, RCODE, KEEP,
    FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT, OWN_COUNT,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sgn,
    H, n_q, n_k, n_out, n_layouts, n_indexed, n_grouped, max_full, max_partial,
    lo, hi, offset, seg_len, seg_step, win_lo, win_hi, self_bias, ramp, qk_scale,
    n_pos, dup_reach, dup_stride, keep_stride,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, SCATTER_O: tl.constexpr,
    WINDOW: tl.constexpr, GROUPS: tl.constexpr, SELF: tl.constexpr, RAMP: tl.constexpr,
    SYMMETRIC: tl.constexpr, REL_TERM: tl.constexpr, DUP: tl.constexpr, PADDED: tl.constexpr,
    PRECISION: tl.constexpr, RUNS: tl.constexpr, WIDE: tl.constexpr, ROWS: tl.constexpr,
    SUB_N: tl.constexpr, ADD_DQ: tl.constexpr,
):  # fmt: skip
    """dQ of ROWS query rows of a layout block, put (:func:`_put`, ``ADD_DQ``) where
    the forward writes their output: at the queries' positions, or in kernel order; with
    REL_TERM the query features' gradient in DQF (kernel order); with RAMP dz_h into
    DSPANS. Each listed key block is taken SUB_N keys at a time."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    Q, K, V, QIDX, KIDX, GLO, GHI, QF, RCODE, KEEP, b, h = _head(
        Q, K, V, QIDX, KIDX, GLO, GHI, QF, RCODE, KEEP, pid_bh,
        sqb, sqh, skb, skh, svb, svh, H, n_q, n_k, n_indexed, n_grouped, dup_stride,
        keep_stride)  # fmt: skip
    sqm, skn, svn, som, sgn = _widen(sqm, skn, svn, som, sgn, WIDE)
    m_start = pid_m * ROWS
    offs_m = m_start + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_in = offs_m < n_q
    q, f, q_pos = _load_queries(Q, QIDX, QF, offs_m, rows_in, sqm, HEAD_DIM, GATHER_Q,
                                REL_TERM)  # fmt: skip
    o_rows = q_pos if SCATTER_O else offs_m
    do, row_max, logsum, delta = _row_grads(DO, MAX, LOGSUM, DELTA, pid_bh, b, h, o_rows,
                                            rows_in, sob, soh, som, n_out, HEAD_DIM)  # fmt: skip
    dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    df = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    dz = tl.zeros([ROWS], tl.float32)
    lay = (pid_bh % n_layouts) * tl.cdiv(n_q, BLOCK_M) + m_start // BLOCK_M
    for walk in tl.static_range(3 if SELF else 2):  # full, masked, holding i == j
        blocks, count, first = _block_list(FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT,
                                           OWN_COUNT, lay, max_full, max_partial, walk,
                                           SELF)  # fmt: skip
        # the rows' key intervals, read by the masked walk only (dead in the full one)
        key_lo, keys, at = _key_interval(offs_m, n_k, lo, hi, offset, seg_len, seg_step,
                                         win_lo, win_hi, SPANS, h, ramp, GLO, GHI, n_q,
                                         WINDOW, RAMP, SYMMETRIC, GROUPS)  # fmt: skip
        for t in range(0, count * (BLOCK_N // SUB_N)):
            start = _step_start(blocks, first, t, RUNS and walk == 0, BLOCK_N, SUB_N)
            offs_n = start + tl.arange(0, SUB_N)
            in_range = offs_n < n_k
            k_pos, k, v = _load_keys(K, V, KIDX, offs_n, in_range, skn, svn, HEAD_DIM,
                                     walk > 0, GATHER_K)  # fmt: skip
            g = _key_features(KF, k_pos, in_range, sgn, HEAD_DIM, walk > 0, REL_TERM)
            qk, weight = _scores(
                q, f, k, g, q_pos, k_pos, offs_m, offs_n, start, in_range, key_lo, keys, at,
                SPANS, RCODE, KEEP, self_bias, ramp, h, qk_scale, n_pos, dup_reach,
                walk > 0, walk == 2, RAMP, SYMMETRIC, REL_TERM, DUP, PADDED, PRECISION,
            )  # fmt: skip
            p = tl.math.exp2((qk * qk_scale - row_max[:, None]) - logsum[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])  # dS, the gradient of the natural-log scores
            if RAMP and walk > 0:  # before m: exp(S - L) (dP - D), dz's term times R
                dz += tl.sum(tl.where(weight < 1.0, ds, 0.0), 1)
                ds = ds * weight
            dq += tl.dot(ds.to(k.dtype), tl.trans(k), input_precision=PRECISION)
            if REL_TERM:
                df += tl.dot(ds.to(k.dtype), g, input_precision=PRECISION)
    scale = qk_scale * LN2
    if WIDE:  # the rows' positions as read before the walks (read again, they cost more)
        o_rows = o_rows.to(tl.int64)
    n_rows = n_out if SCATTER_O else n_q  # at the positions, or in kernel order
    rows = DQ + pid_bh * n_rows * HEAD_DIM + o_rows[:, None] * HEAD_DIM + offs_d[None, :]
    _put(rows, dq * scale, rows_in[:, None], ADD_DQ)
    if REL_TERM:
        rows = DQF + pid_bh * n_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(rows, df * scale, mask=rows_in[:, None])
    if RAMP:
        tl.atomic_add(DSPANS + h, tl.sum(dz, 0) / ramp, sem="relaxed")


@triton.jit
def _flash_bwd_dkdv(
    DO, MAX, LOGSUM, DELTA, DK, DV,
    Q, K, V, QIDX, KIDX, GLO, GHI, QF, KF, SPANS, RCODE, KEEP,
    FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT, OWN_COUNT,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sgn,
    H, n_q, n_k, n_out, n_layouts, n_indexed, n_grouped, max_full, max_partial,
    lo, hi, offset, seg_len, seg_step, win_lo, win_hi, self_bias, ramp, qk_scale,
    n_pos, dup_reach, dup_stride, keep_stride, n_dk,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, SCATTER_O: tl.constexpr,
    WINDOW: tl.constexpr, GROUPS: tl.constexpr, SELF: tl.constexpr, RAMP: tl.constexpr,
    SYMMETRIC: tl.constexpr, REL_TERM: tl.constexpr, DUP: tl.constexpr, PADDED: tl.constexpr,
    PRECISION: tl.constexpr, RUNS: tl.constexpr, WIDE: tl.constexpr, KEYS: tl.constexpr,
    SUB_M: tl.constexpr, SCATTER_K: tl.constexpr, ADD_DKV: tl.constexpr,
):  # fmt: skip
    """dK and dV of KEYS keys of a layout block, put (:func:`_put`, ``ADD_DKV``) in
    DK and DV, [B * H, n_dk, HEAD_DIM], at the keys' positions (``SCATTER_K``) or in
    kernel order; FULL.. are the key-major lists. Each listed query block is taken
    SUB_M rows at a time (fewer live registers beside the two [KEYS, HEAD_DIM]
    accumulators)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    Q, K, V, QIDX, KIDX, GLO, GHI, QF, RCODE, KEEP, b, h = _head(
        Q, K, V, QIDX, KIDX, GLO, GHI, QF, RCODE, KEEP, pid_bh,
        sqb, sqh, skb, skh, svb, svh, H, n_q, n_k, n_indexed, n_grouped, dup_stride,
        keep_stride)  # fmt: skip
    sqm, skn, svn, som, sgn = _widen(sqm, skn, svn, som, sgn, WIDE)
    start = pid_n * KEYS
    offs_n = start + tl.arange(0, KEYS)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = offs_n < n_k
    k_pos, k, v = _load_keys(K, V, KIDX, offs_n, in_range, skn, svn, HEAD_DIM, True, GATHER_K)
    k = tl.trans(k)  # key rows [KEYS, HEAD_DIM]: the tiles are scored transposed, k q^T
    g = _key_features(KF, k_pos, in_range, sgn, HEAD_DIM, True, REL_TERM)
    dk = tl.zeros([KEYS, HEAD_DIM], tl.float32)
    dv = tl.zeros([KEYS, HEAD_DIM], tl.float32)
    lay = (pid_bh % n_layouts) * tl.cdiv(n_k, BLOCK_N) + start // BLOCK_N
    for walk in tl.static_range(3 if SELF else 2):  # full, masked, holding i == j
        blocks, count, first = _block_list(FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT,
                                           OWN_COUNT, lay, max_full, max_partial, walk,
                                           SELF)  # fmt: skip
        for t in range(0, count * (BLOCK_M // SUB_M)):
            m_start = _step_start(blocks, first, t, RUNS and walk == 0, BLOCK_M, SUB_M)
            offs_m = m_start + tl.arange(0, SUB_M)
            rows_in = offs_m < n_q
            q, f, q_pos = _load_queries(Q, QIDX, QF, offs_m, rows_in, sqm, HEAD_DIM, GATHER_Q,
                                        REL_TERM)  # fmt: skip
            key_lo, keys, at = _key_interval(offs_m, n_k, lo, hi, offset, seg_len, seg_step,
                                               win_lo, win_hi, SPANS, h, ramp, GLO, GHI, n_q,
                                               WINDOW, RAMP, SYMMETRIC, GROUPS)  # fmt: skip
            o_rows = q_pos if SCATTER_O else offs_m
            do, row_max, logsum, delta = _row_grads(DO, MAX, LOGSUM, DELTA, pid_bh, b, h, o_rows,
                                                    rows_in, sob, soh, som, n_out,
                                                    HEAD_DIM)  # fmt: skip
            # P^T and dS^T [KEYS, SUB_M], each the A operand of the MMA after it as it
            # comes out of the one before (no transposition through shared memory)
            qk, weight = _scores(
                q, f, k, g, q_pos, k_pos, offs_m, offs_n, start, in_range, key_lo, keys, at,
                SPANS, RCODE, KEEP, self_bias, ramp, h, qk_scale, n_pos, dup_reach,
                walk > 0, walk == 2, RAMP, SYMMETRIC, REL_TERM, DUP, PADDED, PRECISION, True,
            )  # fmt: skip
            p = tl.math.exp2((qk * qk_scale - row_max[None, :]) - logsum[None, :])
            if RAMP and walk > 0:
                p = p * weight
            dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds = p * (dp - delta[None, :])
            dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    at = _position(KIDX, offs_n, in_range, SCATTER_K, WIDE)
    rows = pid_bh * n_dk * HEAD_DIM + at[:, None] * HEAD_DIM + offs_d[None, :]
    _put(DK + rows, dk * (qk_scale * LN2), in_range[:, None], ADD_DKV)
    _put(DV + rows, dv, in_range[:, None], ADD_DKV)


def _add_rows(total: torch.Tensor | None, rows: torch.Tensor, index: torch.Tensor | None,
              n: int) -> torch.Tensor:  # fmt: skip
    """``total`` + a kernel-order buffer [B, H, n_rows, D] added at positions ``index``
    [G|1, n_rows] of a [B, H, n, D] total (a new one when None): rows no kernel puts
    itself (positions that repeat: a token in several clusters; a relative term's
    query features)."""
    if index is None:
        return rows if total is None else total.add_(rows)
    if total is None:
        total = torch.zeros(*rows.shape[:2], n, rows.shape[3], device=rows.device, dtype=rows.dtype)
    heads = rows.shape[:2] if index.shape[0] > 1 else (1, 1)  # per (batch, head) or shared
    total.scatter_add_(2, index.long().view(*heads, -1, 1).expand_as(rows), rows)
    return total


@dataclasses.dataclass(frozen=True)
class Puts:
    """Where one part's two backward launches put their gradient rows: dQ at the
    queries' positions (``dq_placed``: where the forward puts the output) and dK, dV
    at the keys' (``keys_placed``; ``scatter_k``: through the keys' index), or else in
    kernel order for the host to add (:func:`_add_rows`); and whether each adds to the
    rows launches before it put (``add_dq``, ``add_dkv``) or stores them (the first
    launch to reach a tensor, when it puts every row)."""

    dq_placed: bool
    keys_placed: bool
    add_dq: bool
    add_dkv: bool
    scatter_k: bool = False

    @property
    def dq_flags(self) -> dict:
        return {"ADD_DQ": self.add_dq}

    @property
    def dkdv_flags(self) -> dict:
        return {"SCATTER_K": self.scatter_k, "ADD_DKV": self.add_dkv}


def puts(q: torch.Tensor, parts: Sequence[Part]) -> list[Puts]:
    """The :class:`Puts` of each part's launches, in order. Queries are placed where
    the part reads them in place or scatters its output (positions distinct: the
    forward's own contract), keys where they are read in place or through the queries'
    scattered index; a tensor's first launch stores when it puts every row of it and
    q's, k's and v's roles never meet in one launch (k is v: the two adds of one
    program), else adds to zeros."""
    reached: set[int] = set()

    def adds(tensors: Sequence[torch.Tensor], placed: bool, every_row: bool) -> bool:
        ids = [id(t) for t in tensors]
        shared = len(set(ids)) < len(ids) or not reached.isdisjoint(ids)
        reached.update(ids)
        return placed and (shared or not every_row)

    found = []
    for part in parts:
        dq_placed = part.q_index is None or part.scatter
        n_q = q.shape[2] if part.q_index is None else part.q_index.shape[-1]
        add_dq = adds([q], dq_placed, n_q == q.shape[2])
        keys_placed = part.k_index is None or (part.k_index is part.q_index and part.scatter)
        n_k = part.k.shape[2] if part.k_index is None else part.k_index.shape[-1]
        add_dkv = adds([part.k, part.v], keys_placed, n_k == part.k.shape[2])
        scatter_k = keys_placed and part.k_index is not None
        found.append(Puts(dq_placed, keys_placed, add_dq, add_dkv, scatter_k))
    return found


def _put_into(grads: dict, tensor: torch.Tensor, placed: bool, add: bool, rows: int,
              dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The buffer a launch puts ``tensor``'s gradient rows in: its gradient (made here,
    zeroed where the launch adds) when ``placed``, else a kernel-order one of ``rows``."""
    batch, heads, _, dim = tensor.shape
    if not placed:
        return flash.new_output(tensor, (batch, heads, rows, dim), torch.float32)
    if id(tensor) not in grads:
        shape = (batch, heads, tensor.shape[2], dim)
        grads[id(tensor)] = (torch.zeros(shape, device=tensor.device, dtype=dtype) if add
                             else flash.new_output(tensor, shape, dtype))  # fmt: skip
    return grads[id(tensor)]


def key_gradient_part(part: Part, q: torch.Tensor) -> Part:
    """The pairs whose key and value receive a gradient: with ``frozen_memory`` the
    window starts at the query's own segment (memories are stop-gradient)."""
    if not part.frozen_memory:
        return part
    win = part.window
    if win is None or part.groups is not None or part.q_index is not None:
        raise ValueError("flash: frozen_memory needs a position window and no gather")
    own = Window(win.seg_len, win.step, max(win.lo, 0), win.hi)
    n_q, n_k = q.shape[2], part.k.shape[2]
    blocks = (part.layout.block_m, part.layout.block_n)
    layout = cached_layout(n_q, n_k, part.band, own, blocks, q.device)
    return dataclasses.replace(part, layout=layout, window=own)


def _add(grads: dict, tensor: torch.Tensor, value: torch.Tensor) -> None:
    key = id(tensor)
    grads[key] = value if key not in grads else grads[key] + value


def backward(
    q: torch.Tensor,
    parts: Sequence[Part],
    out: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    dout: torch.Tensor,
    dlse: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Gradients of (out, lse) of :func:`~attn_zoo.kernels.flash.forward_with_stats`
    (q, parts), which gave ``out`` and ``stats`` (row max, log2 sum), keyed by ``id``
    of q and of each part's differentiable tensors (:meth:`Part.differentiable`);
    tensors no pair reaches are missing. The kernels put their rows at their
    positions, adding to earlier launches' (:func:`puts`). In float32, but dQ where
    :func:`_dq_in_place`: its rows are written once, in q's dtype (the rounding of a
    float32 row cast afterwards, without the float32 buffer and the cast; dK and dV
    stay float32: cast in the dK/dV pass's epilogue they spill 8-72 bytes)."""
    batch, heads, n, dim = q.shape
    dout = dout.contiguous()
    delta = row_dots(out, dout, dlse)
    grads: dict[int, torch.Tensor] = {}
    plan = puts(q, parts)
    dq_dtype = q.dtype if _dq_in_place(q, parts, plan) else torch.float32
    for part, put in zip(parts, plan, strict=True):
        run = launch(q, part, dout)
        rel, ramp = part.relative, part.ramp
        tile = backward_tile_for(q, part.kind, run.tile)
        dq = _put_into(grads, q, put.dq_placed, put.add_dq, run.n_q, dq_dtype)
        shape = (batch, heads, run.n_q, dim)
        df_rows = flash.new_output(q, shape, torch.float32) if rel else delta  # unread
        dspans = torch.zeros(heads, device=q.device) if ramp else delta  # unread
        rows, step, warps, stages = tile.of("bwd_dq")
        grid = (triton.cdiv(run.n_q, rows), batch * heads)
        _flash_bwd_dq[grid](dout, *stats, delta, dq, df_rows, dspans, *run.args, **run.flags,
                            ROWS=rows, SUB_N=step, **put.dq_flags, num_warps=warps,
                            num_stages=stages)  # fmt: skip
        if not put.dq_placed:
            grads[id(q)] = _add_rows(grads.get(id(q)), dq, part.q_index, n)
        if rel is not None:  # f is read where q is, its rows in kernel order
            grads[id(rel.f)] = _add_rows(grads.get(id(rel.f)), df_rows, part.q_index, n)
        if ramp is not None:
            _add(grads, ramp.spans, dspans)

        keyed = key_gradient_part(part, q)
        run = launch(q, keyed, dout, keyed.layout.by_key)
        dk, dv = (_put_into(grads, tensor, put.keys_placed, put.add_dkv, run.n_k, torch.float32)
                  for tensor in (part.k, part.v))  # fmt: skip
        keys, step, warps, stages = tile.of("bwd_dkdv")
        grid = (triton.cdiv(run.n_k, keys), batch * heads)
        _flash_bwd_dkdv[grid](dout, *stats, delta, dk, dv, *run.args, dk.shape[2], **run.flags,
                              KEYS=keys, SUB_M=step, **put.dkdv_flags, num_warps=warps,
                              num_stages=stages)  # fmt: skip
        if not put.keys_placed:
            for tensor, rows in ((part.k, dk), (part.v, dv)):
                grads[id(tensor)] = _add_rows(grads.get(id(tensor)), rows, part.k_index,
                                              tensor.shape[2])  # fmt: skip
    return grads


def _dq_in_place(q: torch.Tensor, parts: Sequence[Part], plan: Sequence[Puts]) -> bool:
    """Whether each row of dQ is written once and never summed: one part that puts every
    row of dQ, stored, not added (its queries read in place or scattered), with no
    relative term or ramp (whose gradients go on through float32 sums), q neither its
    keys nor its values (a tensor in two roles sums its gradients)."""
    if len(parts) != 1:
        return False
    part, put = parts[0], plan[0]
    rules = (part.relative, part.ramp)
    return (put.dq_placed and not put.add_dq and all(rule is None for rule in rules)
            and q is not part.k and q is not part.v)  # fmt: skip
