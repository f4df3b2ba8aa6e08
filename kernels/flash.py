"""The block-sparse flash-attention forward core: one online-softmax kernel.

For each query block the kernel walks the key blocks its :class:`BlockLayout`
lists, first those that need no element mask, then those that do (with a bias on
the pair i == j, last those holding that pair, so only they test it), in float32
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
* the adaptive-span ramp m_z(x) (Sukhbaatar et al. 2019, Eq. 4-5): its hard edge
  m > 0 in the rows' key intervals, its soft part a weight m on each p;
* a second product of per-position features, f_i . g_j, beside the content term
  (q_i + u) . k_j: the Transformer-XL relative term (q_i + v) . W_R R_(i-j) (Dai et
  al. 2019, Sec. 3.3) in the form :mod:`attn_zoo.xl` rewrites it to;
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import triton
import triton.language as tl

from attn_zoo.kernels.layout import BIG, Band, BlockLayout, Window
from attn_zoo.kernels.tuning import Tile, default_tile, kind_of, masked_walk_tile

LOG2E = 1.4426950408889634


@dataclass(frozen=True, eq=False)
class Ramp:
    """Adaptive span's soft mask m_z(x) = clamp((R + z_h - x) / R, 0, 1), a weight
    on each p (Sukhbaatar et al. 2019, Eq. 4-5); x = i - j, or |i - j| when
    ``symmetric`` (bidirectional: with the pair i == j hidden by a self bias and no
    band offset, as :class:`Part` checks)."""

    spans: torch.Tensor  # z_h [H], float32
    ramp: float  # R
    symmetric: bool


@dataclass(frozen=True, eq=False)
class Relative:
    """Scores q_i . k_j + f_i . g_j: a second product, of query features f and key
    features g, chained into the same MMA accumulator as q . k (one more MMA a tile,
    nothing per score). Transformer-XL's relative term (q_i + v) . W_R R_(i-j) (Dai
    et al. 2019, Sec. 3.3) is such a product by the angle-difference identities of
    its sinusoids (:func:`attn_zoo.xl.relative_terms`; its content bias u is added
    to q before the launch). ``f`` gets a gradient (through it q, v and W_R do);
    ``g`` is a constant of the positions, rows of one table shared by every batch
    and head (a stride-0 view for a row every key shares)."""

    f: torch.Tensor  # [B, H, Nq, D] at the query's position
    g: torch.Tensor  # [Nk, D] at the key's position

    def __post_init__(self):
        if self.g.requires_grad:
            raise ValueError("flash: the key features g of a Relative get no gradient; "
                             "accepted: a tensor that does not require grad")  # fmt: skip


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
    at ``q_index[i]`` when ``scatter`` (else at i; scattered, the positions must be
    distinct, and the backward puts dQ there, and dK and dV too where ``k_index`` is
    ``q_index``). ``groups`` = (q groups [G, n_q], k groups [G, n_k]) sorted along
    the kernel order. ``self_bias`` is added to the score of the pair of equal kernel
    indices, the same position when q and k are read in the same order (no index, or
    one index for both). ``keep`` [B, positions of k] (bool, True = attend) hides
    padded keys. ``tile`` gives the launch's warps and
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

    def __post_init__(self):
        if self.self_bias is not None and self.q_index is not self.k_index:
            raise ValueError("flash: a self_bias needs q and k read in the same order; "
                             "accepted: q_index is k_index (both None, or one tensor)")  # fmt: skip
        if self.ramp is not None and self.ramp.symmetric and (
                self.self_bias is None or self.band.offset != 0):  # fmt: skip
            raise ValueError("flash: a symmetric ramp takes |x| as x with one sign per row "
                             "in a block apart from the pair i == j; accepted: a self_bias "
                             "and a band offset of 0")  # fmt: skip
        if self.self_bias is not None and self.layout.own_count is None:
            raise ValueError("flash: a self_bias needs a layout that lists the blocks "
                             "holding the pair i == j; accepted: one built with "
                             "self_pairs=True")  # fmt: skip

    @cached_property
    def group_runs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query row (kernel order), the run [first, end) of key indices of its
        group: ``groups`` are sorted along the kernel order, so the keys of one group
        are contiguous (int32 [G, n_q] each; the kernels read them as the rows' key
        intervals, never a group per pair)."""
        q_groups, k_groups = self.groups
        shape = (max(q_groups.shape[0], k_groups.shape[0]), -1)
        q_groups, k_groups = (x.expand(shape).contiguous() for x in (q_groups, k_groups))
        return tuple(torch.searchsorted(k_groups, q_groups, side=side).to(torch.int32)
                     for side in ("left", "right"))  # fmt: skip

    @property
    def kind(self) -> str:
        """Its kind of launch (:func:`~attn_zoo.kernels.tuning.kind_of`): what picks its
        warps and stages, and the backward's programs."""
        symmetric = self.ramp is not None and self.ramp.symmetric
        rules = (self.window, self.q_index, self.k_index, self.groups, self.self_bias,
                 self.ramp, self.relative, self.duplicates)  # fmt: skip
        band_only = all(rule is None for rule in rules)  # key padding aside
        return kind_of(self.relative is not None, self.duplicates is not None, band_only,
                       ramp=symmetric)  # fmt: skip

    def differentiable(self) -> list[torch.Tensor]:
        """The tensors a gradient can reach besides q: k, v, the relative term's f, the
        ramp's spans."""
        found = [self.k, self.v]
        if self.relative is not None:
            found.append(self.relative.f)
        if self.ramp is not None:
            found.append(self.ramp.spans)
        return found


@triton.jit
def _by_row(x, TRANS: tl.constexpr):
    """A per-query vector laid along the query axis of a score tile: [M, 1] of an
    [M, N] tile, or [1, M] of a transposed [N, M] one (``TRANS``: the dK/dV pass
    scores k q^T, so that P^T and dS^T come out of the MMA as its next operands)."""
    if TRANS:  # one return: Triton type-checks every return of a function alike
        laid = x[None, :]
    else:
        laid = x[:, None]
    return laid


@triton.jit
def _by_col(x, TRANS: tl.constexpr):
    """A per-key vector laid along the key axis of a score tile (:func:`_by_row`)."""
    if TRANS:
        laid = x[:, None]
    else:
        laid = x[None, :]
    return laid


@triton.jit
def _seen_before(q_pos, k_pos, RCODE, n_pos, reach, DUP: tl.constexpr, TRANS: tl.constexpr):
    """Whether key k_pos is visible to query q_pos in one of the DUP rounds before
    this part's (Eq. 7, :class:`Duplicates`): one code per side and round, and per
    pair one difference d and one unsigned minimum per round, then one compare:
    0 <= d <= reach in some round exactly when min over the rounds of d, read as
    unsigned (negative d wraps past every reach), is at most reach. The rounds unroll
    (DUP is compile-time): a loop nested in the key-block walk would keep the
    software pipeliner from multi-buffering K and V."""
    nearest = 0xFFFFFFFF
    for r in tl.static_range(DUP):
        step = (_by_row(tl.load(RCODE + r * n_pos + q_pos), TRANS)
                - _by_col(tl.load(RCODE + r * n_pos + k_pos), TRANS))  # fmt: skip
        nearest = tl.minimum(nearest, step.to(tl.uint32, bitcast=True))
    return nearest <= tl.cast(reach, tl.uint32)  # reach == 1 arrives as a constexpr


@triton.jit
def _key_features(KF, k_pos, in_range, sgn, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                  REL_TERM: tl.constexpr):  # fmt: skip
    """The key features g [BLOCK_N, HEAD_DIM] of a key block (:class:`Relative`; 0
    without) at the keys' positions, read as :func:`_load_keys` reads v (only a
    masked block can pass the last key): affine in the block's start, so the
    pipeliner copies them ahead with K and V."""
    g = 0
    if REL_TERM:
        g_ptrs = KF + k_pos[:, None] * sgn + tl.arange(0, HEAD_DIM)[None, :]
        if MASKED:
            g = tl.load(g_ptrs, mask=in_range[:, None], other=0.0)
        else:
            g = tl.load(g_ptrs)
    return g


@triton.jit
def _key_interval(offs_m, n_k, lo, hi, offset, seg_len, seg_step, win_lo, win_hi, SPANS, h,
                  ramp, GLO, GHI, n_q, WINDOW: tl.constexpr, RAMP: tl.constexpr,
                  SYMMETRIC: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    """Per query row i, the run of key indices key_lo ... key_lo + keys - 1 that
    every positional rule allows, and at = i + offset. Each rule is an interval of
    j for a given i, so they intersect into one: the :class:`Band`, lo <= i + offset
    - j <= hi; the :class:`Window`; the group (sorted along the kernel order, each
    group's keys are one run, [GLO[i], GHI[i]): :attr:`Part.group_runs`); the key
    count; and the ramp's hard edge (m_z(x) > 0 exactly when x < R + z, so x <=
    ceil(R + z) - 1 for integer x). In int32 (the launch clips the edges to
    +-POSITION_LIMIT, 2^30, and refuses longer inputs), ``keys`` unsigned, 0 for a
    row that sees none: a masked tile then tests each pair with one unsigned compare,
    0 <= j - key_lo < keys, not a 64-bit difference, band, window, group and
    key-range tests per pair."""
    at = offs_m + offset
    key_lo = at - hi
    key_hi = at - lo
    if WINDOW:
        seg = (offs_m // seg_len) * seg_step
        key_lo = tl.maximum(key_lo, seg + win_lo)
        key_hi = tl.minimum(key_hi, seg + win_hi)
    if GROUPS:
        rows_in = offs_m < n_q
        key_lo = tl.maximum(key_lo, tl.load(GLO + offs_m, mask=rows_in, other=0))
        key_hi = tl.minimum(key_hi, tl.load(GHI + offs_m, mask=rows_in, other=0) - 1)
    if RAMP:
        far = (tl.math.ceil(ramp + tl.load(SPANS + h)) - 1.0).to(tl.int32)  # once per head
        key_lo = tl.maximum(key_lo, at - far)
        if SYMMETRIC:
            key_hi = tl.minimum(key_hi, at + far)
    key_lo = tl.minimum(tl.maximum(key_lo, 0), n_k)
    key_hi = tl.maximum(tl.minimum(key_hi, n_k - 1), key_lo - 1)  # key_lo - 1: none
    keys = key_hi - key_lo + 1
    return key_lo, keys.to(tl.uint32, bitcast=True), at


@triton.jit
def _ramp(at, start, cols, SPANS, h, ramp, SYMMETRIC: tl.constexpr, STRADDLES: tl.constexpr,
          TRANS: tl.constexpr):  # fmt: skip
    """Adaptive span's soft mask m_z(x) = clamp((R + z - x) / R, 0, 1) of a tile
    (Eq. 4; its hard edge m > 0 is in the rows' key runs: :func:`_key_interval`), with
    x = i + offset - j, or |x| bidirectionally. Split per row and per column around
    the step's first key, x / R = (at - start) / R - (j - start) / R, so that a pair
    costs one saturating add or FMA (``tl.clamp`` to [0, 1] compiles to FADD.SAT or
    FFMA.SAT: the clamp is free), no conversion, division or separate minimum.
    Bidirectionally x keeps one sign per row in a block that holds no pair i == j
    (offset 0: :class:`Part` checks), so |x| = s x with s = +-1 per row, one FMA per
    pair; only blocks that ``STRADDLES`` the diagonal take |x|, one add more."""
    per = 1.0 / ramp
    reach = (ramp + tl.load(SPANS + h)) * per  # (R + z) / R, once per tile
    near = (at - start).to(tl.float32) * per  # per row
    far = cols.to(tl.float32) * per  # constants
    if SYMMETRIC and STRADDLES:
        return tl.clamp(reach - tl.abs(_by_row(near, TRANS) - _by_col(far, TRANS)), 0.0, 1.0)
    if SYMMETRIC:  # keys all before the row (s = 1) or all after it (s = -1)
        side = tl.where(near > 0.0, 1.0, -1.0)
        return tl.clamp(tl.fma(_by_row(side, TRANS), _by_col(far, TRANS),
                               _by_row(reach - side * near, TRANS)), 0.0, 1.0)  # fmt: skip
    return tl.clamp(_by_row(reach - near, TRANS) + _by_col(far, TRANS), 0.0, 1.0)


@triton.jit
def _head(Q, K, V, QIDX, KIDX, GLO, GHI, QF, RCODE, KEEP, pid_bh,
          sqb, sqh, skb, skh, svb, svh, H, n_q, n_k, n_indexed, n_grouped, dup_stride,
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
    GLO += (pid_bh % n_grouped) * n_q
    GHI += (pid_bh % n_grouped) * n_q
    QF += b * sqb + h * sqh  # laid out as q (:func:`launch`)
    RCODE += pid_bh * dup_stride
    KEEP += b * keep_stride
    return Q, K, V, QIDX, KIDX, GLO, GHI, QF, RCODE, KEEP, b, h


@triton.jit
def _widen(sqm, skn, svn, som, sgn, WIDE: tl.constexpr):
    """The row strides as int64 when a row's offset within a head can pass 2^31
    elements (``WIDE``, decided at launch: :func:`wide_offsets`), so that
    position * stride does not overflow; int32 otherwise (fewer registers)."""
    if WIDE:  # one return: Triton compiles both branches' returns and needs one type
        sqm, skn, svn = tl.cast(sqm, tl.int64), tl.cast(skn, tl.int64), tl.cast(svn, tl.int64)
        som, sgn = tl.cast(som, tl.int64), tl.cast(sgn, tl.int64)
    return sqm, skn, svn, som, sgn


@triton.jit
def _load_queries(Q, QIDX, QF, offs_m, rows_in, sqm, HEAD_DIM: tl.constexpr,
                  GATHER_Q: tl.constexpr, REL_TERM: tl.constexpr):  # fmt: skip
    """A query block: (q, its features f [BLOCK_M, HEAD_DIM] at the queries'
    positions with a :class:`Relative` term (else q again), positions)."""
    offs_d = tl.arange(0, HEAD_DIM)
    if GATHER_Q:
        q_pos = tl.load(QIDX + offs_m, mask=rows_in, other=0)
    else:
        q_pos = offs_m
    q = tl.load(Q + q_pos[:, None] * sqm + offs_d[None, :], mask=rows_in[:, None], other=0.0)
    f = q
    if REL_TERM:
        f = tl.load(QF + q_pos[:, None] * sqm + offs_d[None, :], mask=rows_in[:, None],
                    other=0.0)  # fmt: skip
    return q, f, q_pos


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
def _block_list(FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT, OWN_COUNT, lay, max_full,
                max_partial, walk: tl.constexpr, SELF: tl.constexpr):  # fmt: skip
    """The blocks row ``lay`` of the layout visits in ``walk``: 0 the full ones, with
    the first of them (a run's start); 1 those needing the mask (with SELF, those
    holding no pair i == j); 2 those holding one (they lead the row's masked list:
    :attr:`~attn_zoo.kernels.layout.BlockLayout.own_count`)."""
    if walk == 0:
        blocks = FULL + lay * max_full
        return blocks, tl.load(FULL_COUNT + lay), tl.load(blocks)
    blocks = PARTIAL + lay * max_partial
    count = tl.load(PARTIAL_COUNT + lay)
    if SELF:
        own = tl.load(OWN_COUNT + lay)
        if walk == 1:
            return blocks + own, count - own, 0
        return blocks, own, 0
    return blocks, count, 0


@triton.jit
def _block_at(blocks, first, t, RUN: tl.constexpr):
    """The t-th block of a list: ``first + t`` in a contiguous run (no load in the
    loop, so the pipeliner can issue the next tile's loads early), else loaded."""
    if RUN:
        return first + t
    return tl.load(blocks + t)


@triton.constexpr_function
def _walk_step(walk, step, own_step, block):
    """Keys per inner-loop step of ``walk``: at most one block in the full walk (0),
    whose blocks have no element mask to hide what lies past them; ``step`` in the
    masked walk (1): pieces of a block, or several listed blocks a step
    (:class:`~attn_zoo.kernels.tuning.Tile`); ``own_step`` in the own walk (2), where
    the self test and a symmetric ramp's |x| hold more values per pair, so that a
    narrower step keeps a wide tile's other walks free of spills."""
    if walk == 2:
        return own_step
    return min(step, block) if walk == 0 else step


@triton.jit
def _step_count(count, BLOCK: tl.constexpr, STEP: tl.constexpr):
    """Steps over ``count`` listed blocks of BLOCK indices walked STEP at a time."""
    if STEP > BLOCK:
        return (count + STEP // BLOCK - 1) // (STEP // BLOCK)
    return count * (BLOCK // STEP)


@triton.jit
def _step_start(blocks, first, t, RUN: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr):
    """The first index of step t when the listed blocks of BLOCK indices are walked
    STEP at a time: STEP divides BLOCK (equal, it is the block's start), or STEP is
    a multiple of BLOCK and step t starts at the (t * STEP / BLOCK)-th listed block,
    the list holding runs of STEP / BLOCK consecutive blocks
    (:meth:`~attn_zoo.kernels.layout.BlockLayout.walks_in_steps`)."""
    if STEP > BLOCK:
        return _block_at(blocks, first, t * (STEP // BLOCK), RUN) * BLOCK
    block = _block_at(blocks, first, t // (BLOCK // STEP), RUN)
    return block * BLOCK + (t % (BLOCK // STEP)) * STEP


@triton.jit
def _scores(
    q, f, k, g, q_pos, k_pos, offs_m, offs_n, start, in_range, key_lo, keys, at,
    SPANS, RCODE, KEEP, self_bias, ramp, h, qk_scale, n_pos, dup_reach,
    MASKED: tl.constexpr, SELF: tl.constexpr, RAMP: tl.constexpr,
    SYMMETRIC: tl.constexpr, REL_TERM: tl.constexpr, DUP: tl.constexpr, PADDED: tl.constexpr,
    PRECISION: tl.constexpr, TRANS: tl.constexpr = False,
):  # fmt: skip
    """(scores, weights) of one tile. The scores are before the softmax scale: q . k
    plus every bias divided by ``qk_scale`` (= log2(e) / sqrt(d)), -inf where a pair
    is not visible, so that the softmax weight is exp2(score * qk_scale - m) * weight,
    one FMA and an exp2 per score (the scale is folded into the exponent's argument,
    not a separate multiply). The weight is 1, but adaptive span's m_z(x) in (0, 1]
    on a masked tile: a product, not the bias log m, so no logarithm per pair, and
    the row max taken without it bounds the weighted scores from above.
    ``k`` is k^T [HEAD_DIM, BLOCK_N]; with ``REL_TERM`` the features f . g^T
    (:class:`Relative`) accumulate onto q . k in the same MMA accumulator.
    ``TRANS``: the transposed tile [BLOCK_N, BLOCK_M], k q^T from key rows ``k``
    [BLOCK_N, HEAD_DIM] (the dK/dV pass: :func:`_by_row`), every rule the same.
    The forward and both backward passes score tiles here, so they cannot disagree."""
    if TRANS:
        qk = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if REL_TERM:
            qk = tl.dot(g, tl.trans(f), qk, input_precision=PRECISION)
    else:
        qk = tl.dot(q, k, input_precision=PRECISION)
        if REL_TERM:
            qk = tl.dot(f, tl.trans(g), qk, input_precision=PRECISION)
    weight = 1.0
    if DUP:  # a pair an earlier round shows was counted there
        qk = tl.where(_seen_before(q_pos, k_pos, RCODE, n_pos, dup_reach, DUP, TRANS),
                      float("-inf"), qk)  # fmt: skip
    if PADDED:  # key padding, in every block (the layout does not know it)
        kept = tl.load(KEEP + k_pos, mask=in_range, other=0)
        qk = tl.where(_by_col(kept, TRANS) != 0, qk, float("-inf"))
    if MASKED:  # band, window, group and key range: the row's run (:func:`_key_interval`)
        cols = tl.arange(0, offs_n.shape[0])  # offs_n - start, constants: no add per key
        ahead = _by_col(cols, TRANS) - _by_row(key_lo - start, TRANS)
        ahead = ahead.to(tl.uint32, bitcast=True)
        visible = ahead < _by_row(keys, TRANS)  # 0 <= offs_n - key_lo < keys, one compare
        qk = tl.where(visible, qk, float("-inf"))
        if SELF:  # the pair i == j of kernel indices (:class:`Part`), against constants
            own = ahead == _by_row((offs_m - key_lo).to(tl.uint32, bitcast=True), TRANS)
            qk = tl.where(own, qk + self_bias, qk)
        if RAMP:  # m > 0 on the row's interval: the soft part only, no division
            weight = _ramp(at, start, cols, SPANS, h, ramp, SYMMETRIC, SELF, TRANS)
    return qk, weight


@triton.jit
def _flash_fwd(
    O, MAX, LOGSUM,
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
    PRECISION: tl.constexpr, RUNS: tl.constexpr, WIDE: tl.constexpr, STEP_N: tl.constexpr,
    OWN_STEP: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    Q, K, V, QIDX, KIDX, GLO, GHI, QF, RCODE, KEEP, b, h = _head(
        Q, K, V, QIDX, KIDX, GLO, GHI, QF, RCODE, KEEP, pid_bh,
        sqb, sqh, skb, skh, svb, svh, H, n_q, n_k, n_indexed, n_grouped, dup_stride,
        keep_stride)  # fmt: skip
    sqm, skn, svn, som, sgn = _widen(sqm, skn, svn, som, sgn, WIDE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_in = offs_m < n_q
    q, f, q_pos = _load_queries(Q, QIDX, QF, offs_m, rows_in, sqm, HEAD_DIM, GATHER_Q,
                                REL_TERM)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lay = (pid_bh % n_layouts) * tl.cdiv(n_q, BLOCK_M) + pid_m
    for walk in tl.static_range(3 if SELF else 2):  # full, masked, holding i == j
        blocks, count, first = _block_list(FULL, FULL_COUNT, PARTIAL, PARTIAL_COUNT,
                                           OWN_COUNT, lay, max_full, max_partial, walk,
                                           SELF)  # fmt: skip
        # the rows' key intervals, read by the masked walk only (dead in the full one)
        key_lo, keys, at = _key_interval(offs_m, n_k, lo, hi, offset, seg_len, seg_step,
                                         win_lo, win_hi, SPANS, h, ramp, GLO, GHI, n_q,
                                         WINDOW, RAMP, SYMMETRIC, GROUPS)  # fmt: skip
        for t in range(0, _step_count(count, BLOCK_N, _walk_step(walk, STEP_N, OWN_STEP,
                                                                   BLOCK_N))):  # fmt: skip
            start = _step_start(blocks, first, t, RUNS and walk == 0, BLOCK_N,
                                _walk_step(walk, STEP_N, OWN_STEP, BLOCK_N))  # fmt: skip
            offs_n = start + tl.arange(0, _walk_step(walk, STEP_N, OWN_STEP, BLOCK_N))
            in_range = offs_n < n_k
            k_pos, k, v = _load_keys(K, V, KIDX, offs_n, in_range, skn, svn, HEAD_DIM,
                                     walk > 0, GATHER_K)  # fmt: skip
            g = _key_features(KF, k_pos, in_range, sgn, HEAD_DIM, walk > 0, REL_TERM)
            qk, weight = _scores(
                q, f, k, g, q_pos, k_pos, offs_m, offs_n, start, in_range, key_lo, keys, at,
                SPANS, RCODE, KEEP, self_bias, ramp, h, qk_scale, n_pos, dup_reach,
                walk > 0, walk == 2, RAMP, SYMMETRIC, REL_TERM, DUP, PADDED, PRECISION,
            )  # fmt: skip
            # the online softmax, in the exp2 domain (m_i in scaled units)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if walk == 0 and not PADDED and not DUP:
                m_safe = m_new  # no mask in a full block: every score, so m_new, finite
            else:  # a row may have seen no key yet: exp2(-inf - -inf) would be NaN
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
            if RAMP and walk > 0:
                p = p * weight
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
    f, g = features(q, relative) if relative is not None else (q, q[0, 0])
    win = part.window if part.window is not None else Window(1, 0, -BIG, BIG)
    band = part.band
    if max(n_q, n_k) > POSITION_LIMIT or not -POSITION_LIMIT <= band.offset <= POSITION_LIMIT - n_q:
        raise ValueError(f"flash: {n_q} queries, {n_k} keys, band offset {band.offset}; "
                         f"accepted: lengths and |i + offset| up to 2^30")  # fmt: skip
    args = [
        q, k, v,
        part.q_index if part.q_index is not None else dummy,
        part.k_index if part.k_index is not None else dummy,
        *(part.group_runs if groups is not None else (dummy, dummy)),
        f, g,
        ramp.spans.float().contiguous() if ramp is not None else q,
        dup.codes if dup is not None else dummy,
        keep,
        layout.full, layout.full_count, layout.partial, layout.partial_count,
        layout.own_count if layout.own_count is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        g.stride(0),
        heads, n_q, n_k, out.shape[2], layout.full.shape[0],
        next((x.shape[0] for x in (part.q_index, part.k_index) if x is not None), 1),
        groups[0].shape[0] if groups is not None else 1,
        layout.full.shape[2], layout.partial.shape[2],
        *map(_edge, (band.lo, band.hi)), band.offset, win.seg_len, win.step,
        *map(_edge, (win.lo, win.hi)),
        (part.self_bias if part.self_bias is not None else 0.0) * dim**0.5,  # / the scale
        ramp.ramp if ramp is not None else 1.0,
        dim**-0.5 * LOG2E,
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
        WIDE=wide_offsets(q, k, v, out, g[None, None]),
    )  # fmt: skip
    return Launch(args, flags, n_q, n_k, out.shape[2], part_tile(q, part))


def features(q: torch.Tensor, relative: Relative) -> tuple[torch.Tensor, torch.Tensor]:
    """A :class:`Relative`'s features in q's dtype: f laid out as q (the kernels read
    it with q's strides), g with unit stride along D."""
    f = relative.f.to(q.dtype)
    if f.shape != q.shape:
        raise ValueError(f"flash: query features {tuple(f.shape)}; accepted: q's shape "
                         f"{tuple(q.shape)}")  # fmt: skip
    if f.stride() != q.stride():
        f = torch.empty_strided(q.shape, q.stride(), device=q.device, dtype=q.dtype).copy_(f)
    g = relative.g.to(q.dtype)
    if g.dim() != 2 or g.shape[1] != q.shape[3]:
        raise ValueError(f"flash: key features {tuple(g.shape)}; accepted: [N_k, {q.shape[3]}]")
    return f, g if g.stride(1) == 1 else g.contiguous()


#: Lengths and query positions shifted by a band's offset, i + offset, stay within
#: this, so that the kernels' per-row key runs (:func:`_key_interval`) are int32 with
#: the edges clipped to it: a difference of two such values cannot overflow.
POSITION_LIMIT = 2**30


def _edge(value: int) -> int:
    """A band or window edge clipped to +-POSITION_LIMIT: the same pairs (no key
    index or shifted position reaches past it), an int32 argument (BIG is not)."""
    return max(-POSITION_LIMIT, min(POSITION_LIMIT, value))


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
    tile = default_tile(q.shape[-1], q.dtype, part.kind)
    return Tile(part.layout.block_m, part.layout.block_n, tile.warps, tile.stages)


def forward_tile(q: torch.Tensor, part: Part) -> Tile:
    """The tile ``part``'s forward runs: :func:`part_tile`, but one key block a step
    where its masked walk cannot take several (:attr:`Tile.span`): under a self bias,
    in an lsh round testing many earlier ones
    (:func:`~attn_zoo.kernels.tuning.masked_walk_tile`), or where the layout's masked
    lists are not runs of a step's blocks
    (:meth:`~attn_zoo.kernels.layout.BlockLayout.walks_in_steps`). The same pairs
    either way, in fewer, wider steps."""
    earlier = part.duplicates.round if part.duplicates is not None else 0
    tile = masked_walk_tile(part_tile(q, part), q.shape[-1], part.self_bias is not None, earlier)
    return tile if tile.span == 1 or part.layout.walks_in_steps(tile.span) else tile.in_blocks()


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
        run, tile = launch(q, part, out), forward_tile(q, part)
        grid = (triton.cdiv(run.n_q, part.layout.block_m), batch * heads)
        _flash_fwd[grid](out, row_max, row_logsum, *run.args, **run.flags,
                         STEP_N=tile.step, OWN_STEP=tile.own_step, ACCUMULATE=i > 0,
                         num_warps=tile.warps, num_stages=tile.stages)  # fmt: skip
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
