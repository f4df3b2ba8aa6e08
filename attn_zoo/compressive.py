"""Compressive Transformer attention (Rae et al. 2019, "Compressive
Transformers for Long-Range Sequence Modelling", Sec. 3, Alg. 1).

The sequence is processed as segments of length L = n_s. Segment s attends to

    [compressed memory (Mc slots); memory (the M previous positions); segment],

causally within the segment. Algorithm 1, after segment t's attention, moves
the oldest n_s memories ``m_t[:n_s]`` into the compressed memory at rate c
(f_c: mean pooling, max pooling, or a 1-D convolution with kernel = stride =
c) and keeps the Mc most recent slots. With L <= M that is every position
older than the memory; with L > M only the M memorized positions of each
segment are compressed (M / c slots per segment) and the other L - M are
lost (L = 16, M = 8, Mc = 8, c = 2: position 48 sees slots of 8 ... 15 and
24 ... 31, then the memory 40 ... 47).

Memories get no gradient from the attention (stop-gradient as in
Transformer-XL): slots are pooled from detached keys and values, so through
them only the convolution's weights learn; the paper trains f_c with the
attention-reconstruction loss, :func:`attention_reconstruction_loss`. In
bidirectional mode the whole segment is visible.

Switches, each off by default:

* ``attend_initial_memory``: Algorithm 1 starts from zero memories m_0 = 0
  and cm_0 = 0, which are attended like any other key (score 0, value 0)
  until real positions replace them. Read literally that is an artifact of
  the training loop: by default the zero slots are masked, so a sequence's
  first tokens attend only to real positions.
* ``compress_all_older``: every position older than the memory is
  compressed, including those Algorithm 1 loses when L > M (the rule of
  attn-zoo 0.1).

The interface receives keys and values, not hidden states, so k and v are
compressed separately. Mean pooling and the convolution commute with the
key and value projections, so this equals Algorithm 1's compression of the
hidden states; max pooling does not commute, and ``max`` here pools k and v
separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attn_zoo import oracle
from attn_zoo.flex import flex, flex_options
from attn_zoo.interface import Mechanism, Plan
from attn_zoo.kernels.device_constants import on_device
from attn_zoo.kernels.runtime import triton_options
from attn_zoo.registry import register
from attn_zoo.tiles import (
    as_tiles,
    attend,
    blocks,
    chunks,
    gather,
    key_mask,
    merge,
    run_chunk,
    scatter,
    window,
)
from attn_zoo.xl import segment_starts as _segment_starts

COMPRESSIONS = ("mean", "max", "conv")


@dataclass(frozen=True)
class CompressiveConfig:
    segment_len: int = 512  # L, the attention window (Sec. 5.2, WikiText-103: 512)
    mem_len: int = 512  # M (WikiText-103: 512)
    cmem_len: int = 512  # Mc, compressed slots (WikiText-103: 512)
    rate: int = 2  # c (WikiText-103: 2)
    compression: str = "mean"  # f_c: mean | max | conv
    seed: int = 0  # draws the conv compression's weights
    attend_initial_memory: bool = False  # attend Alg. 1's zero m_0, cm_0 (see the docstring)
    compress_all_older: bool = False  # compress positions Alg. 1 loses when L > M


@dataclass(frozen=True, eq=False)
class CompressivePlan(Plan):
    segment_len: int
    mem_len: int
    cmem_len: int
    rate: int
    compression: str
    conv_k: torch.Tensor | None  # [H, D_out, D_in, c] for compression == "conv"
    conv_v: torch.Tensor | None
    per_segment: int  # n: slots compressed after each segment
    first_slot: int  # g0: slots g < g0 hold Alg. 1's zero memories
    slot_positions: torch.Tensor  # [G, c]: the positions of slots g0 .. g0 + G - 1
    attend_initial: bool
    all_older: bool

    @property
    def slots(self) -> int:
        """Compressed slots with real positions, over the whole sequence."""
        return self.slot_positions.shape[0]

    def slot_window(self, segment: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(first slot index into ``slot_positions`` that segment s sees, Mc): the
        window [s n - Mc, s n), shifted by g0 (indices below 0 are zero memories)."""
        return segment * self.per_segment - self.cmem_len - self.first_slot, self.cmem_len

    def slot_keep(self) -> torch.Tensor | None:
        """Key padding of the slots [B, G]: a slot holding a padded position is hidden."""
        return None if self.keep is None else self.keep[:, self.slot_positions].all(-1)

    def initial_keys(self, positions: torch.Tensor) -> torch.Tensor:
        """Zero memories (raw and compressed) each query position sees when
        ``attend_initial``: Alg. 1's m_0 = 0 and cm_0 = 0 not yet replaced."""
        s = positions // self.segment_len
        raw = (self.mem_len - s * self.segment_len).clamp(0, self.mem_len)
        real_slots = (s * self.per_segment - self.first_slot).clamp(0, self.cmem_len)
        return raw + self.cmem_len - real_slots


def slot_layout(n: int, segment_len: int, mem_len: int, rate: int, per_segment: int):
    """(g0, positions [G, c]) of the slots Algorithm 1 fills over n positions: slot
    g = t n + r, compressed after segment t, holds the c positions from
    t L - M + r c. Slots whose positions are negative (g < g0) hold zero memories."""
    segments = -(-n // segment_len)
    g = torch.arange(max(segments - 1, 0) * per_segment)
    t, r = g // max(per_segment, 1), g % max(per_segment, 1)
    starts = t * segment_len - mem_len + r * rate
    real = starts >= 0
    positions = starts[real][:, None] + torch.arange(rate)
    return int((~real).sum()), positions


def compress(x: torch.Tensor, rate: int, how: str, weight: torch.Tensor | None = None):
    """f_c over consecutive groups of ``rate`` rows: [B, H, N, D] -> [B, H, N // rate, D]."""
    b, h, n, d = x.shape
    groups = x[:, :, : n // rate * rate].reshape(b, h, n // rate, rate, d)
    if how == "mean":
        return groups.mean(3)
    if how == "max":
        return groups.amax(3)
    return torch.einsum("bhgtd,hetd->bhge", groups, weight.transpose(-1, -2).to(x.dtype))


def attention_reconstruction_loss(
    q: torch.Tensor,
    old_k: torch.Tensor,
    old_v: torch.Tensor,
    rate: int,
    compression: str = "mean",
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rae et al. 2019, Alg. 1 (attention-reconstruction loss): the mean squared
    difference between attending to the evicted memory and to its compression,
    with queries and old memory detached, so only f_c (``weights`` for conv)
    learns from it. Shapes [B, H, *, D]."""
    q, old_k, old_v = q.detach(), old_k.detach(), old_v.detach()
    wk, wv = weights if weights is not None else (None, None)
    ck, cv = compress(old_k, rate, compression, wk), compress(old_v, rate, compression, wv)
    full, _ = attend(q, old_k, old_v)
    compressed, _ = attend(q, ck, cv)
    return F.mse_loss(compressed, full)


@register
class Compressive(Mechanism):
    name = "compressive"
    small: ClassVar[dict] = {"segment_len": 8, "mem_len": 8, "cmem_len": 4, "rate": 2}
    Config = CompressiveConfig
    citation = (
        "Rae et al. 2019, Compressive Transformers for Long-Range Sequence Modelling (Alg. 1)"
    )
    summary = "[compressed memory; memory; segment], old memory compressed at rate c"
    complexity = "O(N (Mc + M + L)) time and memory"
    oracle_summary = (
        "dense softmax over [all compressed slots; all positions] (compressed by its own "
        "pooling/conv code) with a 0/-inf mask of the visible slots and positions"
    )

    def learnable(self, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
        """The convolution f_c (kernel = stride = c) for keys and values, [H, D, D, c]
        each, N(0, 1/(D c)) from ``seed``; mean and max pooling learn nothing."""
        cfg = self.config
        if cfg.compression != "conv":
            return {}
        g = torch.Generator().manual_seed(cfg.seed)
        scale = (head_dim * cfg.rate) ** -0.5
        shape = (heads, head_dim, head_dim, cfg.rate)
        return {name: torch.randn(shape, generator=g, dtype=torch.float32) * scale
                for name in ("conv_k", "conv_v")}  # fmt: skip

    def plan(self, q, k, v, causal: bool, params: dict | None = None) -> CompressivePlan:
        cfg = self.config
        if cfg.compression not in COMPRESSIONS:
            raise ValueError(
                f"compressive: unknown compression {cfg.compression!r}; "
                f"accepted: {', '.join(COMPRESSIONS)}"
            )
        if cfg.rate < 1 or cfg.segment_len % cfg.rate or cfg.mem_len % cfg.rate:
            raise ValueError(
                f"compressive: rate c={cfg.rate} must divide segment_len={cfg.segment_len} "
                f"and mem_len={cfg.mem_len}"
            )
        conv = (None, None)
        if cfg.compression == "conv":
            shape = q.shape[1], q.shape[3]
            params = params or on_device(q.device, lambda: self.learnable(*shape), self.name,
                                         cfg, *shape)  # fmt: skip
            conv = (params["conv_k"].to(q.device), params["conv_v"].to(q.device))
        n = q.shape[2]
        evicted = cfg.segment_len if cfg.compress_all_older else min(cfg.segment_len, cfg.mem_len)
        per_segment = evicted // cfg.rate
        slots = (n, cfg.segment_len, cfg.mem_len, cfg.rate, per_segment)
        first, positions = on_device(q.device, lambda: slot_layout(*slots), "slots", *slots)
        return CompressivePlan(
            q.shape[0], q.shape[1], n, n, causal, cfg.segment_len, cfg.mem_len,
            cfg.cmem_len, cfg.rate, cfg.compression, *conv, per_segment, first,
            positions, cfg.attend_initial_memory, cfg.compress_all_older,
        )  # fmt: skip

    def oracle(self, q, k, v, plan: CompressivePlan, rows):
        """Algorithm 1 replayed on position lists (None for a zero memory), then one
        dense softmax over [every slot ever filled; one zero key; all positions]:
        each row's visible slots and positions get bias 0, the zero key log(count)."""
        slots, states = _replay_algorithm_1(plan)
        slot_key = {slot: key for key, slot in enumerate(slots)}
        rows = rows.to(q.device)
        segment = (rows // plan.segment_len).tolist()
        n_slots = len(slots)
        vis = torch.zeros(len(segment), n_slots + 1 + plan.n_k, dtype=torch.bool)
        zeros = torch.zeros(len(segment), dtype=torch.float64)
        for r, (i, s) in enumerate(zip(rows.tolist(), segment, strict=True)):
            cmem, mem = states[s]
            for key in [slot_key[x] for x in cmem if x is not None]:
                vis[r, key] = True
            for j in mem:
                if j is not None:
                    vis[r, n_slots + 1 + j] = True
            own = range(s * plan.segment_len, min((s + 1) * plan.segment_len, plan.n_k))
            for j in own:
                vis[r, n_slots + 1 + j] = j <= i or not plan.causal
            zeros[r] = sum(x is None for x in cmem + mem) if plan.attend_initial else 0
        bias = oracle.mask_bias(vis.to(q.device))
        bias[:, n_slots] = torch.log(zeros).to(q.device)
        index = torch.tensor([j for slot in slots for j in slot], dtype=torch.long)
        ck = _pool(k.detach().double()[:, :, index.to(q.device)], plan, plan.conv_k)
        cv = _pool(v.detach().double()[:, :, index.to(q.device)], plan, plan.conv_v)
        zero = k.new_zeros(*k.shape[:2], 1, k.shape[3]).double()
        keys = torch.cat([ck, zero, k.double()], 2)
        values = torch.cat([cv, zero, v.double()], 2)
        j = torch.arange(plan.n_k, device=q.device)[None, :]
        recent = j < _segment_starts(rows[:, None], plan.segment_len)
        # slots are pooled from detached memories, so only f_c's weights learn through them
        stop = torch.cat([torch.zeros(len(segment), n_slots + 1, dtype=torch.bool,
                                      device=q.device), recent], dim=-1)  # fmt: skip
        keep = None
        if plan.keep is not None:  # a slot holding a padded position is hidden
            slot_keep = plan.keep[:, index.to(q.device)].view(len(plan.keep), n_slots, -1)
            keep = torch.cat([slot_keep.all(-1), plan.keep[:, :1] | True, plan.keep], dim=1)
        return [oracle.Term(bias, k=keys, v=values, stop_grad=stop, keep=keep)]


def _replay_algorithm_1(plan: CompressivePlan):
    """Rae et al. 2019, Alg. 1 on positions: (every slot ever filled, as tuples of
    positions; per segment the (cm_t, m_t) it attends, None for a zero memory)."""
    L, c = plan.segment_len, plan.rate
    mem, cmem = [None] * plan.mem_len, [None] * plan.cmem_len  # m_0 = 0, cm_0 = 0
    slots, states = [], []
    for s in range(-(-plan.n_k // L)):
        states.append((list(cmem), list(mem)))
        segment = list(range(s * L, min((s + 1) * L, plan.n_k)))
        history = mem + segment
        # old_mem <- m_t[:n_s]; or every position older than the new memory
        old = history[: max(len(history) - plan.mem_len, 0)] if plan.all_older else mem[:L]
        new = [tuple(old[a : a + c]) for a in range(0, len(old) - c + 1, c)]
        new = [None if None in x else x for x in new]  # f_c(0) = 0
        slots += [x for x in new if x is not None]
        cmem = (cmem + new)[len(cmem) + len(new) - plan.cmem_len :]
        mem = history[len(history) - plan.mem_len :] if plan.mem_len else []
    return slots, states


def _pool(x: torch.Tensor, plan: CompressivePlan, weight: torch.Tensor | None) -> torch.Tensor:
    """The oracle's own f_c, through torch.nn.functional's pooling and conv1d."""
    b, h, n, d = x.shape
    c = plan.rate
    if n < c:
        return x[:, :, :0]
    seq = x.transpose(-1, -2)  # [B, H, D, N]
    if plan.compression == "conv":
        per_head = [F.conv1d(seq[:, hh], weight[hh].double(), stride=c) for hh in range(h)]
        return torch.stack(per_head, 1).transpose(-1, -2)
    pool = F.avg_pool1d if plan.compression == "mean" else F.max_pool1d
    return pool(seq.reshape(b * h, d, n), c, c).reshape(b, h, d, -1).transpose(-1, -2)


def compressed_memory(k, v, plan: CompressivePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """f_c of every slot with real positions, [B, H, G, D] each (no gradient to k, v).
    A slot's c positions start at t L - M + r c, a multiple of c (c divides L and M),
    so each slot is one of f_c's groups over the whole sequence: the sequence is
    compressed in one pass and the slots' groups picked, not gathered first."""
    groups = torch.div(plan.slot_positions[:, 0], plan.rate, rounding_mode="floor")
    return (compress(x.detach(), plan.rate, plan.compression, w).index_select(2, groups)
            for x, w in ((k, plan.conv_k), (v, plan.conv_v)))  # fmt: skip


def with_initial_memory(out: torch.Tensor, lse: torch.Tensor, plan: CompressivePlan):
    """Merge the zero memories into an (out, lse) over the real keys: count zero
    keys of score 0 and value 0 add only ``count`` to each row's denominator."""
    if not plan.attend_initial:
        return out
    count = plan.initial_keys(torch.arange(plan.n_q, device=out.device)).to(lse.dtype)
    zeros = (torch.zeros_like(out, dtype=lse.dtype), torch.log(count).expand_as(lse))
    return merge([(out.to(lse.dtype), lse), zeros])[0].to(out.dtype)


@Compressive.implementation("reference")
def compressive_reference(mech, q, k, v, plan: CompressivePlan) -> torch.Tensor:
    """Segments a chunk at a time (:func:`~attn_zoo.tiles.chunks`): keys [Mc slots |
    M memory | L segment] per segment. Zero memories (index -1 in the slot and
    memory parts) are zero rows, visible only with ``attend_initial_memory``."""
    n, seg, mem = plan.n_q, plan.segment_len, plan.mem_len
    ck, cv = compressed_memory(k, v, plan)
    if plan.slots == 0:  # no real slot yet: a placeholder, always masked or zero
        ck, cv = k.new_zeros(*k.shape[:2], 1, k.shape[3]), v.new_zeros(*v.shape[:2], 1, v.shape[3])

    def segments(q, k, v, ck, cv, qi, index):  # qi [s, L]: segments number index [s]
        start = qi[:, 0]
        first, width = plan.slot_window(index)
        si = window(first, width, plan.slots)  # [s, Mc] slots, -1: a zero memory
        mi = window(start - mem, mem, n)  # [s, M] memory
        ci = window(start, seg, n)  # [s, L] the segment
        if not plan.attend_initial:  # zero memories are masked: drop what no segment here sees
            si, mi = si[:, (si >= 0).any(0)], mi[:, (mi >= 0).any(0)]
        real = torch.cat([si, mi], -1) >= 0  # [s, slots + memory]
        kg = torch.cat([gather(ck, as_tiles(si)), gather(k.detach(), as_tiles(mi))], -2)
        vg = torch.cat([gather(cv, as_tiles(si)), gather(v.detach(), as_tiles(mi))], -2)
        if plan.attend_initial:  # zero memories are attended as zero rows
            kg, vg = kg * real[..., None], vg * real[..., None]
        kg = torch.cat([kg, gather(k, as_tiles(ci))], -2)
        vg = torch.cat([vg, gather(v, as_tiles(ci))], -2)
        i, j = qi[:, :, None], ci[:, None, :]
        current = (j >= 0) & (i >= 0) & ((j <= i) if plan.causal else True)
        memories = real | plan.attend_initial
        vis = torch.cat([memories[:, None, :].expand(-1, seg, -1), current], dim=-1)
        keep = None
        if plan.keep is not None:  # zero memories are no padding
            keep = torch.cat([key_mask(plan.slot_keep(), as_tiles(si)) | (si < 0),
                              key_mask(plan.keep, as_tiles(mi)) | (mi < 0),
                              key_mask(plan.keep, as_tiles(ci))], dim=-1)  # fmt: skip
        return attend(gather(q, as_tiles(qi)), kg, vg, vis, keep=keep, need_lse=False)[0]

    qi = blocks(n, seg, q.device)  # [S, L]
    index = torch.arange(len(qi), device=q.device)
    keys = plan.cmem_len + mem + seg
    out = [run_chunk(segments, q, k, v, ck, cv, qi[part], index[part])
           for part in chunks(len(qi), seg, keys, q)]  # fmt: skip
    return scatter(torch.cat(out, dim=2), as_tiles(qi), n).to(q.dtype)


@Compressive.implementation("triton", **triton_options())
def compressive_triton(mech, q, k, v, plan: CompressivePlan) -> torch.Tensor:
    """Memory + segment launch, then the compressed slots accumulated
    (kernels/memory.py); zero memories merged afterwards when attended."""
    from attn_zoo.kernels.memory import compressive_attention

    ck, cv = compressed_memory(k, v, plan)
    out, lse = compressive_attention(q, k, v, ck.contiguous(), cv.contiguous(), plan,
                                     plan.slot_keep())  # fmt: skip
    return with_initial_memory(out, lse, plan)


@Compressive.implementation("flex", **flex_options(differentiable=False))
def compressive_flex(mech, q, k, v, plan: CompressivePlan) -> torch.Tensor:
    """Keys [all compressed slots; all positions] with one mask_mod over both; zero
    memories merged afterwards when attended. Memories are not detached here, so it
    is registered without a backward pass."""
    seg, mem = plan.segment_len, plan.mem_len
    ck, cv = compressed_memory(k, v, plan)
    slots, causal = ck.shape[2], plan.causal

    def slots_memory_segment(b, h, i, j):
        first, width = plan.slot_window(i // seg)
        slot = (j < slots) & (j >= first) & (j < first + width)
        r = j - slots
        start = i - i % seg
        raw = (r >= 0) & (r >= start - mem) & ((r <= i) if causal else (r < start + seg))
        return slot | raw

    keys, values = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
    keep = None if plan.keep is None else torch.cat([plan.slot_keep(), plan.keep], dim=1)
    out, lse = flex(q, keys, values, slots_memory_segment, keep=keep,
                    need_lse=plan.attend_initial)  # fmt: skip
    return with_initial_memory(out, lse, plan)
