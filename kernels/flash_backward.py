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
caller that merges more keys later) enters as D - dL. Every kernel writes
its rows in kernel order into buffers of its own; gathered parts are added back
at their positions with ``scatter_add`` (a position may sit in several clusters).
Nothing N x N is stored; beyond q, k, v, o and the gradients the extra memory
is D (one float per row) and the per-part row buffers.
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
    SUB_N: tl.constexpr,
):  # fmt: skip
    """dQ of ROWS query rows of a layout block (kernel order); with REL_TERM the query
    features' gradient in DQF; with RAMP dz_h into DSPANS. Each listed key block is
    taken SUB_N keys at a time."""
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
    rows = DQ + pid_bh * n_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(rows, dq * scale, mask=rows_in[:, None])
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
    n_pos, dup_reach, dup_stride, keep_stride,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER_Q: tl.constexpr, GATHER_K: tl.constexpr, SCATTER_O: tl.constexpr,
    WINDOW: tl.constexpr, GROUPS: tl.constexpr, SELF: tl.constexpr, RAMP: tl.constexpr,
    SYMMETRIC: tl.constexpr, REL_TERM: tl.constexpr, DUP: tl.constexpr, PADDED: tl.constexpr,
    PRECISION: tl.constexpr, RUNS: tl.constexpr, WIDE: tl.constexpr, KEYS: tl.constexpr,
    SUB_M: tl.constexpr,
):  # fmt: skip
    """dK and dV of KEYS keys of a layout block (kernel order); FULL.. are the
    key-major lists. Each listed query block is taken SUB_M rows at a time (fewer
    live registers beside the two [KEYS, HEAD_DIM] accumulators)."""
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
    rows = pid_bh * n_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + rows, dk * (qk_scale * LN2), mask=in_range[:, None])
    tl.store(DV + rows, dv, mask=in_range[:, None])


def _add_rows(total: torch.Tensor | None, rows: torch.Tensor, index: torch.Tensor | None,
              n: int) -> torch.Tensor:  # fmt: skip
    """``total`` + a kernel-order buffer [B, H, n_rows, D] added at positions
    ``index`` [G|1, n_rows] of a [B, H, n, D] total (a new one when None)."""
    if index is None:
        return rows if total is None else total.add_(rows)
    if total is None:
        total = torch.zeros(*rows.shape[:2], n, rows.shape[3], device=rows.device, dtype=rows.dtype)
    heads = rows.shape[:2] if index.shape[0] > 1 else (1, 1)  # per (batch, head) or shared
    total.scatter_add_(2, index.long().view(*heads, -1, 1).expand_as(rows), rows)
    return total


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
    tensors no pair reaches are missing. In float32, but dQ where :func:`_dq_in_place`:
    its rows are written once, in q's dtype (the rounding of a float32 row cast
    afterwards, without the float32 buffer and the cast; dK and dV stay float32: cast
    in the dK/dV pass's epilogue they spill 8-72 bytes)."""
    batch, heads, n, dim = q.shape
    dout = dout.contiguous()
    delta = row_dots(out, dout, dlse)
    grads: dict[int, torch.Tensor] = {}
    dq = None
    dq_dtype = q.dtype if _dq_in_place(q, parts) else torch.float32
    for part in parts:
        run = launch(q, part, dout)
        rel, ramp = part.relative, part.ramp
        tile = backward_tile_for(q, part.kind, run.tile)
        shape = (batch, heads, run.n_q, dim)
        dq_rows = flash.new_output(q, shape, dq_dtype)
        df_rows = flash.new_output(q, shape, torch.float32) if rel else delta  # unread
        dspans = torch.zeros(heads, device=q.device) if ramp else delta  # unread
        rows, step, warps, stages = tile.of("bwd_dq")
        grid = (triton.cdiv(run.n_q, rows), batch * heads)
        _flash_bwd_dq[grid](dout, *stats, delta, dq_rows, df_rows, dspans, *run.args,
                            **run.flags, ROWS=rows, SUB_N=step, num_warps=warps,
                            num_stages=stages)  # fmt: skip
        if rel is not None:  # f is read where q is
            grads[id(rel.f)] = _add_rows(grads.get(id(rel.f)), df_rows, part.q_index, n)
        if ramp is not None:
            _add(grads, ramp.spans, dspans)
        dq = _add_rows(dq, dq_rows, part.q_index, n)

        keyed = key_gradient_part(part, q)
        run = launch(q, keyed, dout, keyed.layout.by_key)
        dk_rows, dv_rows = (flash.new_output(q, (batch, heads, run.n_k, dim), torch.float32)
                            for _ in range(2))  # fmt: skip
        keys, step, warps, stages = tile.of("bwd_dkdv")
        grid = (triton.cdiv(run.n_k, keys), batch * heads)
        _flash_bwd_dkdv[grid](dout, *stats, delta, dk_rows, dv_rows, *run.args, **run.flags,
                              KEYS=keys, SUB_M=step, num_warps=warps,
                              num_stages=stages)  # fmt: skip
        for tensor, rows in ((part.k, dk_rows), (part.v, dv_rows)):
            grads[id(tensor)] = _add_rows(grads.get(id(tensor)), rows, part.k_index,
                                          tensor.shape[2])  # fmt: skip
    _add(grads, q, dq)
    return grads


def _dq_in_place(q: torch.Tensor, parts: Sequence[Part]) -> bool:
    """Whether each row of dQ is written once and never summed: one part, its queries
    read in place (no gather), with no relative term or ramp (whose gradients go on
    through float32 sums), q neither its keys nor its values (a tensor in two roles
    sums its gradients)."""
    if len(parts) != 1:
        return False
    part = parts[0]
    rules = (part.q_index, part.relative, part.ramp)
    return all(rule is None for rule in rules) and q is not part.k and q is not part.v
