"""Which key blocks each query block visits, and which of them need an element mask.

The kernel (:mod:`attn_zoo.kernels.flash`) works on *kernel indices*: positions in the
order the launch reads q and k (the natural order, or a sorted / gathered order
given by index tensors). Visibility of the pair (i, j) is the conjunction of

* a :class:`Band` on the index difference, ``lo <= (i + offset) - j <= hi``
  (causal with an offset, keys longer than the queries, sliding windows);
* an optional :class:`Window` that depends on i's segment,
  ``s * step + lo <= j <= s * step + hi`` with ``s = i // seg_len``
  (Transformer-XL and compressive memories, Sparse Transformer blocks, Reformer chunks);
* optional group equality, ``group_q[i] == group_k[j]``, for groups sorted along
  the kernel order (hash buckets, clusters, strided columns).

Both interval ends are non-decreasing in i, so a query block's rows see keys in
``[first(block start), last(block end)]`` at most, and every row sees
``[first(block end), last(block start)]``. That classifies each (query block,
key block) in O(1): untouched, *full* (every pair visible, no element mask), or
*partial*. The layout costs O((N / block)^2) integers, never N x N.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from attn_zoo.kernels.device_constants import on_device

BIG = 1 << 40  # an unbounded edge


@dataclass(frozen=True)
class Band:
    """lo <= (i + offset) - j <= hi. For per-head layouts, ``lo`` and ``hi`` may be
    tensors [G] (one band per layout row)."""

    lo: int = -BIG
    hi: int = BIG
    offset: int = 0


@dataclass(frozen=True)
class Window:
    """j in [s * step + lo, s * step + hi] for s = i // seg_len."""

    seg_len: int
    step: int
    lo: int
    hi: int


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Per layout row g (shared by the (batch, head) pairs with bh % G == g) and
    query block: the key blocks to visit. ``full`` [G, n_qb, max] need no element
    mask, ``partial`` [G, n_qb, max] do; -1 pads; counts [G, n_qb]. ``n_kb`` key
    blocks in all. ``own_count`` [G, n_qb], for a layout built with ``self_pairs``
    (else None): how many of a row's partial blocks hold a pair i == j; they lead
    its list, so the forward tests that pair in those blocks only."""

    block_m: int
    block_n: int
    full: torch.Tensor
    full_count: torch.Tensor
    partial: torch.Tensor
    partial_count: torch.Tensor
    n_kb: int
    own_count: torch.Tensor | None = None
    runs: bool | None = None  # full_runs when known (None: computed on first use)
    bound: BlockLayout | None = None

    # ``bound``: a layout kept on the host whose lists hold this one's, the same
    # positional rules without groups (:func:`build_layout`): its widths size this
    # one's lists and its runs are this one's, so that building this one (per call,
    # with a mechanism's groups) reads nothing back from the device.

    @cached_property
    def full_runs(self) -> bool:
        """Whether every row's full blocks are one contiguous run (bands, windows,
        segments, memories): the kernels then walk ``first + t``, an address the
        software pipeliner can compute ahead, instead of loading each index."""
        return self.runs if self.runs is not None else _runs(self.full, self.full_count)

    @cached_property
    def widths(self) -> tuple[int, int]:
        """(widest row's full blocks, widest row's full and partial blocks together):
        the widths of lists that hold a subset of each row's."""
        visited = self.full_count + self.partial_count
        return self.full.shape[-1], max(1, int(visited.max()) if visited.numel() else 1)

    def rows(self, pick: slice) -> BlockLayout:
        """Layout rows ``pick`` as a layout of their own (views of these tensors, as
        wide). Their full blocks are in runs where every row's are; where not, the
        kernels read their indices, which is right for runs too."""
        own = self.own_count[pick] if self.own_count is not None else None
        return BlockLayout(self.block_m, self.block_n, self.full[pick], self.full_count[pick],
                           self.partial[pick], self.partial_count[pick], self.n_kb, own,
                           self.full_runs, self.bound)  # fmt: skip

    def walks_in_steps(self, span: int) -> bool:
        """Whether every row's masked list can be walked ``span`` blocks a step, the
        step starting at every span-th entry (the forward's wide steps,
        :attr:`~attn_zoo.kernels.tuning.Tile.span`): each step's blocks cover the
        row's masked blocks, no block twice and none of its full blocks (a step past
        the list's last block reaches blocks the row does not visit: the element mask
        hides them). Read from the device once per layout and span."""
        known = self.__dict__.setdefault("_walks_in_steps", {})
        if span not in known:
            known[span] = span == 1 or _in_steps(self, span)
        return known[span]

    @property
    def blocks_visited(self) -> int:
        return int(self.full_count.sum() + self.partial_count.sum())

    @cached_property
    def by_key(self) -> BlockLayout:
        """The same pairs of blocks key-major, for the dK/dV pass of the backward:
        row r lists the query blocks that visit key block r (full / partial / own as
        here); block sizes keep their meaning. O(1) per pair of blocks, computed
        once per layout."""
        n_qb = self.full.shape[1]
        full, partial = (_unpack(x, self.n_kb).transpose(1, 2) for x in (self.full, self.partial))
        own = None
        if self.own_count is not None:  # the leading own_count entries of each row
            leading = torch.arange(self.partial.shape[-1], device=self.partial.device)
            listed = torch.where(leading < self.own_count[..., None], self.partial, -1)
            own = _unpack(listed, self.n_kb).transpose(1, 2)
        bound = self.bound.by_key if self.bound is not None else None
        return _packed(self.block_m, self.block_n, full, partial, n_qb, own, bound)


def _packed(block_m: int, block_n: int, full: torch.Tensor, partial: torch.Tensor, n_kb: int,
            own: torch.Tensor | None = None,
            bound: BlockLayout | None = None) -> BlockLayout:  # fmt: skip
    """A :class:`BlockLayout` from [G, rows, n_kb] masks of its full and partial blocks
    and, of the partial ones, those holding a pair i == j (``own``; None without self
    pairs), which lead each row's list; with a ``bound`` (:class:`BlockLayout`), lists
    as wide as its and its runs, nothing read from the masks' device."""
    own_count = None if own is None else own.sum(-1).to(torch.int32).contiguous()
    full_width, width = bound.widths if bound is not None else (None, None)
    runs = bound.full_runs if bound is not None else None
    return BlockLayout(block_m, block_n, *_pack(full, width=full_width),
                       *_pack(partial, own, width), n_kb, own_count, runs, bound)  # fmt: skip


def _pack(mask: torch.Tensor, first: torch.Tensor | None = None,
          width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """[G, n_qb, n_kb] bool -> (indices [G, n_qb, width] padded with -1, counts),
    ascending, but the blocks of ``first`` (within ``mask``) ahead of the others.
    ``width``: at least the widest row's count (None: that count, read from the
    device; at least 1)."""
    counts = mask.sum(-1).to(torch.int32)
    if width is None:
        width = max(1, int(counts.max()) if counts.numel() else 1)
    rank = (~mask).to(torch.int8) * 2
    if first is not None:
        rank += (~first).to(torch.int8)
    order = torch.argsort(rank, dim=-1, stable=True)[..., :width]
    keep = torch.arange(width, device=mask.device) < counts[..., None]
    return torch.where(keep, order, -1).to(torch.int32).contiguous(), counts.contiguous()


def _runs(packed: torch.Tensor, counts: torch.Tensor) -> bool:
    """Whether each row of ``packed`` (ascending, -1 padded) is first, first + 1, ..."""
    if packed.numel() == 0:
        return True
    last = packed.gather(-1, (counts.long() - 1).clamp(min=0)[..., None])[..., 0]
    return bool(((counts == 0) | (last - packed[..., 0] + 1 == counts)).all())


def _in_steps(layout: BlockLayout, span: int) -> bool:
    """:meth:`BlockLayout.walks_in_steps` for ``span`` > 1."""
    partial, n_kb = layout.partial, layout.n_kb
    leads = torch.arange(partial.shape[-1], device=partial.device)
    leads = (leads % span == 0) & (leads < layout.partial_count[..., None])
    covered = torch.zeros(*partial.shape[:2], n_kb + span, dtype=torch.int32,
                          device=partial.device)  # fmt: skip
    for j in range(span):  # the j-th block of each step
        at = torch.where(leads, partial + j, n_kb + span - 1).long()
        covered.scatter_add_(2, at, leads.to(torch.int32))
    covered = covered[..., :n_kb]
    listed, full = _unpack(partial, n_kb), _unpack(layout.full, n_kb)
    return bool((covered <= 1).all() and (covered.bool() >= listed).all()
                and not (covered.bool() & full).any())  # fmt: skip


def _unpack(packed: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of :func:`_pack`: [G, rows, max] (-1 padded) -> [G, rows, width] bool."""
    dense = torch.zeros(*packed.shape[:2], width + 1, dtype=torch.bool, device=packed.device)
    dense.scatter_(2, torch.where(packed < 0, width, packed).long(), True)
    return dense[..., :width]


def _ends(n: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index of each block of ``block`` indices in [0, n)."""
    start = torch.arange(0, n, block, device=device)
    return start, torch.clamp(start + block, max=n) - 1


def build_layout(
    n_q: int,
    n_k: int,
    band: Band = Band(),
    window: Window | None = None,
    *,
    q_groups: torch.Tensor | None = None,
    k_groups: torch.Tensor | None = None,
    self_pairs: bool = False,
    full_band: Band | None = None,
    partial_only: bool = False,
    block_m: int = 64,
    block_n: int = 64,
    device=None,
) -> BlockLayout:
    """The layout of one launch.

    ``q_groups`` / ``k_groups`` [G, n] are sorted along the kernel order.
    ``self_pairs``: q and k share an order and the kernel scores the pair i == j
    specially, so blocks holding it stay partial, listed first in their row
    (``own_count``). ``full_band`` narrows what may be *full* (the adaptive-span
    ramp is 1 only there). ``partial_only``: every visited block is partial, for a
    launch that tests groups the layout was not given. With groups (and a band of
    plain integers) the layout reads nothing back from the device: its lists are as
    wide as those of the same positions without groups, built once on the host
    (:attr:`BlockLayout.bound`), and the positions' part of its masks is made once
    per device.
    """
    shape = (n_q, n_k, band, window, self_pairs, block_m, block_n)
    plain = not any(isinstance(x, torch.Tensor) for x in (band.lo, band.hi))
    if q_groups is not None and plain:  # built per call: the positions' part kept
        where = torch.device(device) if device is not None else q_groups.device
        found = on_device(where, lambda: _positions(*shape), "layout-positions", *shape)
    else:
        found = _positions(*shape, device)
    a_, b_, c_, d_, touched, full, apart = found
    if q_groups is not None:
        a, b, c, d = a_[:, 0], b_[:, 0], c_[0], d_[0]
        qa, qb = q_groups[:, a][..., :, None], q_groups[:, b][..., :, None]
        kc, kd = k_groups[:, c][..., None, :], k_groups[:, d][..., None, :]
        touched = touched & (qa <= kd) & (kc <= qb)
        full = full & (qa == qb) & (kc == kd) & (qa == kc)
    if full_band is not None:
        full = full & (a_ + band.offset - d_ >= _rows(full_band.lo, device))
        full = full & (b_ + band.offset - c_ <= _rows(full_band.hi, device))
    full = full & touched & (not partial_only)
    partial = touched & ~full
    own = partial & ~apart if self_pairs else None
    bound = None
    if q_groups is not None and plain:
        # groups sorted along the kernel order only take blocks away, and keep a row's
        # full blocks one run where the positions alone do: one group's whole key
        # blocks are a run, and so is their meet with a run
        bound = cached_layout(n_q, n_k, band, window, (block_m, block_n), torch.device("cpu"),
                              self_pairs)  # fmt: skip
    return _packed(block_m, block_n, full, partial, d_.shape[-1], own, bound)


def _rows(x, device):
    """A per-layout-row band edge [G] as [G, 1, 1] (an int as it is)."""
    return x.to(device).view(-1, 1, 1) if isinstance(x, torch.Tensor) else x


def _positions(n_q: int, n_k: int, band: Band, window: Window | None, self_pairs: bool,
               block_m: int, block_n: int, device=None):  # fmt: skip
    """What the positions alone decide: the blocks' first and last indices (a, b
    [n_qb, 1] of the queries', c, d [1, n_kb] of the keys'), and which block pairs they
    touch, which they see whole, and which hold no pair i == j ([G|1, n_qb, n_kb])."""
    a, b = _ends(n_q, block_m, device)  # query block ends [n_qb]
    c, d = _ends(n_k, block_n, device)  # key block ends [n_kb]

    def rows(x):
        return _rows(x, device)

    def first(i):
        lo = i + band.offset - rows(band.hi)
        if window is not None:
            lo = torch.maximum(lo, (i // window.seg_len) * window.step + window.lo)
        return lo

    def last(i):
        hi = i + band.offset - rows(band.lo)
        if window is not None:
            hi = torch.minimum(hi, (i // window.seg_len) * window.step + window.hi)
        return hi

    a_, b_, c_, d_ = a[:, None], b[:, None], c[None, :], d[None, :]
    touched = (first(a_) <= d_) & (last(b_) >= c_) & (first(a_) <= last(b_))
    full = (first(b_) <= c_) & (last(a_) >= d_)
    full &= (b_ - a_ + 1 == block_m) & (d_ - c_ + 1 == block_n)
    apart = (b_ < c_) | (d_ < a_)  # no index in both blocks: no pair i == j
    if self_pairs:
        full &= apart
    touched, full = (x if x.dim() == 3 else x[None] for x in (touched, full))  # [G|1, ..]
    return a_, b_, c_, d_, touched, full, apart


@lru_cache(maxsize=128)
def cached_layout(
    n_q: int,
    n_k: int,
    band: Band,
    window: Window | None,
    blocks: tuple[int, int],
    device: torch.device,
    self_pairs: bool = False,
    partial_only: bool = False,
) -> BlockLayout:
    """:func:`build_layout` for masks that depend on positions only, for ``blocks`` =
    (block_m, block_n), cached per block shape."""
    return build_layout(n_q, n_k, band, window, self_pairs=self_pairs,
                        partial_only=partial_only, block_m=blocks[0], block_n=blocks[1],
                        device=device)  # fmt: skip
