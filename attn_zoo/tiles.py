"""Gathered attention: the four steps every efficient reference is made of.

An efficient mechanism lists, for each tile of queries, the keys that tile may
see (``index`` tensors of positions, -1 for padding), then

1. :func:`gather` pulls those rows out of q, k, v,
2. :func:`attend` runs a masked softmax on the small tiles, returning the
   output and the per-row log-sum-exp,
3. :func:`scatter` puts tile rows back at their positions,
4. :func:`merge` combines partial results over disjoint key sets by their
   log-sum-exp, exactly as flash attention combines key blocks.

No step ever holds an N x N tensor. Tiles run a chunk at a time (:func:`chunks`,
:func:`attend_tiles`), as many as fit a memory budget for their scores, so the
peak memory of a reference is that budget plus O(N x D), not rows x keys per
row; under autograd each chunk is checkpointed (recomputed in the backward), so
the backward keeps that bound.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

NEG_INF = float("-inf")

#: Bytes of scores a chunk of tiles may hold, unless ``ATTN_ZOO_REFERENCE_BUDGET_MB`` or
#: :func:`score_budget` says otherwise.
DEFAULT_BUDGET = 64 << 20
#: Bytes per score a chunk holds in :func:`attend`: up to four float32 [rows, keys] tensors
#: alive at once (scores, biased scores, masked scores, weights).
SCORE_BYTES = 4 * 4
_budget: list[int] = []


def budget() -> int:
    """The score budget in bytes in force."""
    if _budget:
        return _budget[-1]
    return int(float(os.environ.get("ATTN_ZOO_REFERENCE_BUDGET_MB", 0)) * 2**20) or DEFAULT_BUDGET


@contextmanager
def score_budget(nbytes: int):
    """Run the references with chunks of at most ``nbytes`` of scores (at least one
    tile per chunk)."""
    if nbytes < 1:
        raise ValueError(f"score budget must be a positive number of bytes, got {nbytes}")
    _budget.append(int(nbytes))
    try:
        yield
    finally:
        _budget.pop()


def chunks(n_tiles: int, rows: int, keys: int, like: torch.Tensor,
           per_score: int = SCORE_BYTES) -> Iterator[slice]:  # fmt: skip
    """Consecutive slices of ``n_tiles`` tiles of [rows, keys] scores (per batch and
    head of ``like`` [B, H, ...]), ``per_score`` bytes each, that fit :func:`budget`."""
    per_tile = like.shape[0] * like.shape[1] * rows * keys * per_score
    step = max(1, budget() // max(1, per_tile))
    for start in range(0, n_tiles, step):
        yield slice(start, min(start + step, n_tiles))


def run_chunk(body: Callable, *args):
    """``body(*args)``, checkpointed when autograd records a tensor in ``args`` (its
    scores are then recomputed in the backward instead of kept): pass the inputs
    that need gradients as arguments, not through a closure."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                       for a in args):  # fmt: skip
        return checkpoint(body, *args, use_reentrant=False)
    return body(*args)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """The accumulation type of the references: float32, or float64 for float64 inputs."""
    return x if x.dtype == torch.float64 else x.float()


def softmax_lse(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax of x, logsumexp of x) along ``dim``, where an all -inf slice
    gives weights 0 and lse -inf, and no NaN in forward or backward (the
    shift and the empty-slice guard stay out of the gradient's way)."""
    top = x.detach().amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    e = torch.exp(x - top)
    total = e.sum(dim, keepdim=True)
    nonempty = total > 0
    total = torch.where(nonempty, total, 1.0)
    lse = torch.where(nonempty, top + torch.log(total), NEG_INF)
    return e / total, lse.squeeze(dim)


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [B, H, N, D] at positions ``index`` [B|1, H|1, *tile] (-1 for
    padding, which reads row 0 and must be masked by the caller).
    Returns [B, H, *tile, D]."""
    b, h, _, d = x.shape
    tile = index.shape[2:]
    flat = index.clamp_min(0).reshape(index.shape[0], index.shape[1], -1)
    flat = flat.expand(b, h, -1)
    rows = x.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, d))
    return rows.reshape(b, h, *tile, d)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention over the last two dims, accumulated in float32 (float64
    for float64 inputs).

    ``visible`` (bool) and ``bias`` (additive) broadcast against the
    scores [..., q_rows, k_rows]; ``keep`` [..., k_rows] (bool, from
    :func:`key_mask`) hides padded keys. Returns (out [..., q_rows, D],
    lse [..., q_rows], None unless ``need_lse``); a row with no visible key gives
    out 0 and lse -inf, never NaN.

    One pass per step over the scores, in place: the scale rides on q, the masks
    merge into one fill, and torch's fused softmax (and logsumexp) do the rest;
    rows with no visible key are found on the mask, which is smaller than the
    scores, and are left unmasked inside the softmax and zeroed in the output.
    """
    scores = (upcast(q) * q.shape[-1] ** -0.5) @ upcast(k).transpose(-2, -1)
    if bias is not None:  # in place: neither step's backward reads the scores
        scores.add_(bias)
        del bias  # freed here when the caller passed it without keeping a reference
    hidden = None if visible is None else ~visible
    if keep is not None:
        padded = ~keep.unsqueeze(-2)
        hidden = padded if hidden is None else hidden | padded
    empty = None
    if hidden is not None:
        empty = hidden.all(-1, keepdim=True)
        scores.masked_fill_(hidden & ~empty, NEG_INF)
    weights = torch.softmax(scores, dim=-1)
    lse = torch.logsumexp(scores, dim=-1) if need_lse else None
    del scores  # the softmax's backward keeps its output, not the scores
    out = weights @ upcast(v)
    if empty is not None and empty.any():
        out = out.masked_fill(empty, 0.0)
        lse = None if lse is None else lse.masked_fill(empty.squeeze(-1), NEG_INF)
    return out, lse


def attend_tiles(q, k, v, qi, ki, visible=None, bias=None, keep=None, terms=None,
                 per_score=SCORE_BYTES, need_lse=True):  # fmt: skip
    """gather -> :func:`attend` -> scatter, a chunk of tiles at a time: query tiles
    ``qi`` [B|1, H|1, T, r] and their keys ``ki`` [B|1, H|1, T, w] (positions, -1
    pads); ``visible`` / ``bias`` broadcast against [B, H, T, r, w], or ``terms(part)``
    builds them for the tiles ``part`` (a slice) inside the chunk, holding
    ``per_score`` bytes per score at once (the budget's unit); ``keep`` [B, N]
    key padding; ``ki`` with T = 1 gives every tile the same keys. Returns
    (out [B, H, N, D], lse [B, H, N] or None unless ``need_lse``) at the tiles'
    positions."""

    def along_tiles(x, part):  # a mask or bias broadcast over tiles stays whole
        return x if x is None or x.dim() < 3 or x.shape[-3] == 1 else x[..., part, :, :]

    def tiles(q, k, v, part):
        qc, kc = qi[..., part, :], ki if ki.shape[-2] == 1 else ki[..., part, :]
        vis, add = terms(part) if terms else (along_tiles(visible, part), along_tiles(bias, part))
        return attend(gather(q, qc), gather(k, kc), gather(v, kc), vis, add, key_mask(keep, kc),
                      need_lse)  # fmt: skip

    parts = chunks(qi.shape[-2], qi.shape[-1], ki.shape[-1], q, per_score)
    outs = [run_chunk(tiles, q, k, v, part) for part in parts]
    out = torch.cat([o for o, _ in outs], dim=2)
    if not need_lse:
        return scatter(out, qi, q.shape[2]), None
    return scatter_result((out, torch.cat([lse for _, lse in outs], dim=2)), qi, q.shape[2])


def key_mask(keep: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """A key-padding mask [B, N] (True = attend) at key positions ``index``
    [B|1, H|1, *tile] (-1 padding is hidden too): [B, 1|H, *tile], or None
    when nothing is padded."""
    if keep is None:
        return None
    padded = torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], dim=1)  # -1 reads column N
    flat = torch.where(index >= 0, index, keep.shape[1]).reshape(*index.shape[:2], -1)
    rows = padded[:, None, :].expand(-1, flat.shape[1], -1)
    picked = rows.gather(2, flat.expand(keep.shape[0], -1, -1))
    return picked.view(keep.shape[0], flat.shape[1], *index.shape[2:])


def scatter(tiles: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`gather` for an ``index`` that holds each position in
    [0, n) once (padding -1 is dropped): [B, H, *tile, E] -> [B, H, n, E]."""
    b, h = tiles.shape[:2]
    e = tiles.shape[-1]
    flat = index.reshape(index.shape[0], index.shape[1], -1).expand(b, h, -1)
    src = tiles.reshape(b, h, -1, e)
    keep = flat >= 0
    out = tiles.new_zeros(b, h, n + 1, e)  # row n collects the padding
    target = torch.where(keep, flat, n).unsqueeze(-1).expand(-1, -1, -1, e)
    out = out.scatter(2, target, src)
    return out[:, :, :n]


def scatter_result(
    result: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scatter` for an (out, lse) pair from :func:`attend`."""
    out, lse = result
    both = scatter(torch.cat([out, lse.unsqueeze(-1)], dim=-1), index, n)
    return both[..., :-1], both[..., -1]


def merge(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (out, lse) results over disjoint key sets into the softmax over
    their union: out = sum_p exp(lse_p - lse) out_p, lse = logsumexp_p lse_p."""
    weights, lse = softmax_lse(torch.stack([p_lse for _, p_lse in parts]), dim=0)
    out = sum(w.unsqueeze(-1) * p_out for w, (p_out, _) in zip(weights, parts, strict=True))
    return out, lse


def blocks(n: int, size: int, device=None) -> torch.Tensor:
    """Positions [0, n) cut into tiles of ``size``: [ceil(n/size), size], -1 padded."""
    nb = -(-n // size)
    pos = torch.arange(nb * size, device=device).view(nb, size)
    return torch.where(pos < n, pos, -1)


def window(starts: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """For each start s, positions [s, s + width) clipped to [0, n): [..., width], -1 padded."""
    pos = starts.unsqueeze(-1) + torch.arange(width, device=starts.device)
    return torch.where((pos >= 0) & (pos < n), pos, -1)


def as_tiles(index: torch.Tensor) -> torch.Tensor:
    """Give a position-only index [*tile] the [1, 1, *tile] batch/head dims."""
    return index.view(1, 1, *index.shape)
