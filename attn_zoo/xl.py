"""Transformer-XL attention (Dai et al. 2019, "Transformer-XL: Attentive
Language Models Beyond a Fixed-Length Context", Sec. 3.2-3.3).

The sequence is processed as segments of length L. Segment s attends to its
own positions (causally) and to a memory of the M positions before it, whose
keys and values get no gradient (SG in Eq. of Sec. 3.2). Scores use relative
positions (Sec. 3.3):

    A_ij = (q_i + u) . k_j  +  (q_i + v) . W_R R_(i-j),      scaled by 1/sqrt(d),

with sinusoidal R, distances beyond ``clamp_len`` sharing one embedding
(``clamp_len`` None or <= 0: no clamping, as in the authors' code). u, v and
W_R are model parameters; here they are drawn from N(0, 1/d) with an explicit
seed, in float32 whatever torch's default dtype. ``same_length`` makes every
query see the same number of keys, M: key j is visible iff i - j < M (the
authors' code, ``tril(ones, -mask_shift_len)``; L = M = 8, i = 8 sees
1 ... 8, not 0). In bidirectional mode the whole segment is visible and
negative distances get their own embeddings.

The reference computes the relative term the paper's way: one product
(q + v) R^T over all distances, then the relative shift. Its position
sequence runs from klen down to -(L - 1) (as in XLNet), so the shifted matrix
is exact in every entry, masked or not; the oracle builds the term pair by
pair, so a wrong shift shows. The triton impl needs neither table nor shift:
R's sinusoids turn the term into a product of query and key features
(:func:`relative_terms`), a second MMA beside q . k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attn_zoo import oracle
from attn_zoo.flex import flex, flex_options
from attn_zoo.interface import Mechanism, Plan
from attn_zoo.kernels.device_constants import on_device
from attn_zoo.kernels.layout import BIG
from attn_zoo.kernels.runtime import triton_options
from attn_zoo.registry import register
from attn_zoo.tiles import (
    as_tiles,
    attend,
    blocks,
    chunks,
    gather,
    key_mask,
    run_chunk,
    scatter,
    upcast,
    window,
)


@dataclass(frozen=True)
class XLConfig:
    segment_len: int = 512  # L (enwik8 training: 512)
    mem_len: int = 512  # M (enwik8 training: 512)
    same_length: bool = False  # every query sees the same number of keys
    clamp_len: int | None = None  # distances beyond share one embedding; None or <= 0: none
    seed: int = 0  # draws u, v and W_R


@dataclass(frozen=True, eq=False)
class XLPlan(Plan):
    segment_len: int
    mem_len: int
    same_length: bool
    u: torch.Tensor  # [H, D]
    v: torch.Tensor  # [H, D]
    rel: torch.Tensor  # [H, 2 * max_dist + 1, D]: W_R R_d for d = -max_dist .. max_dist
    max_dist: int
    w_r: torch.Tensor  # [H, D, D'] (the kernels' form of the term: relative_terms)
    clamp_len: int | None = None

    def rel_at(self, distance: torch.Tensor) -> torch.Tensor:
        """W_R R_d for integer distances d (any shape): [H, *shape, D]."""
        return self.rel[:, distance + self.max_dist]


def angles(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """d w_t for w_t = 1 / 10000^(2t / dim), t < dim / 2, float64 [len, dim / 2]."""
    steps = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)
    return positions.double()[:, None] * (1.0 / 10000 ** (steps / dim))[None, :]


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """R_d = [sin(d w), cos(d w)], w_t = 1 / 10000^(2t / dim) (Vaswani et al. 2017)."""
    theta = angles(positions, dim)
    return torch.cat([theta.sin(), theta.cos()], dim=-1)


Term = tuple[int, int, torch.Tensor, torch.Tensor]


def relative_terms(q: torch.Tensor, plan: XLPlan) -> list[Term]:
    """The relative term (q_i + v) . W_R R_(i-j) (Sec. 3.3) as products f_i . g_j of
    per-position features, for the kernels: (lo, hi, f [B, H, N, D'], g [N, D']), in
    q's dtype (computed in float32), for the pairs with lo <= i - j <= hi.

    With a_i = W_R^T (q_i + v) = [a_s, a_c] (its parts on R's sines and cosines), the
    angle-difference identities sin((i-j)w) = sin(iw) cos(jw) - cos(iw) sin(jw) and
    cos((i-j)w) = cos(iw) cos(jw) + sin(iw) sin(jw) give

        a_i . R_(i-j) = f_i . g_j,  f_i = [a_s sin(iw) + a_c cos(iw), a_c sin(iw) - a_s cos(iw)],
                                     g_j = [cos(jw), sin(jw)],

    exactly, for every distance of either sign: no distance table and no shift, one
    more product beside q . k. Beyond ``clamp_len`` c, R is R_(+-c) whatever the
    distance, so there f = a and g = R_(+-c) for every key: a term each for
    i - j > c and i - j < -c.

    The features are laid out by frequency, (f_s, f_c) of frequency t side by side
    (g and R alike: a product is the same sum in any order both share), so that the
    rotation is one complex product per pair, (a_s + i a_c)(sin - i cos) = f_s + i f_c:
    in all four passes over [B, H, N, D] (q + v, the product with W_R, the rotation,
    the cast to q's dtype), with the tables of the positions made once per device."""
    dim = plan.w_r.shape[-1]
    turn, g, by_frequency = on_device(q.device, lambda: _position_tables(q.shape[2], dim, q.dtype),
                                      "xl-positions", q.shape[2], dim, q.dtype)  # fmt: skip
    real = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64
    w_r = plan.w_r.to(real)[..., by_frequency]  # [H, D, D'], columns (s_0, c_0, s_1, ...)
    a = torch.matmul(torch.add(q, plan.v[:, None, :].to(real)), w_r[None])
    f = torch.view_as_real(torch.view_as_complex(a.unflatten(-1, (-1, 2))) * turn)
    f = f.flatten(-2).to(q.dtype)  # once, not at each of the three launches
    clamp = plan.clamp_len
    if clamp is None or clamp <= 0 or clamp >= plan.max_dist:
        return [(-BIG, BIG, f, g)]
    terms = [(-clamp, clamp, f, g)]
    a = a.to(q.dtype)  # one tensor for both clamped parts
    for lo, hi, d in ((clamp + 1, BIG, clamp), (-BIG, -clamp - 1, -clamp)):
        row = sinusoid(torch.full((1,), d, device=q.device), dim)[..., by_frequency]
        terms.append((lo, hi, a, row.to(q.dtype).expand(q.shape[2], dim)))
    return terms


def _position_tables(n: int, dim: int, dtype: torch.dtype):
    """For positions 0..n-1, by frequency (:func:`relative_terms`): sin(iw) - i cos(iw)
    [n, D' / 2] complex (of float32, or of float64 for ``dtype`` float64), the queries'
    rotation; g = (cos(jw), sin(jw)) pairs [n, D'] in ``dtype``, the keys' features; and
    the order that lays a [sines | cosines] vector out by frequency (s_0, c_0, s_1, ...)."""
    theta = angles(torch.arange(n), dim)
    real = torch.promote_types(dtype, torch.float32)
    turn = torch.complex(theta.sin(), -theta.cos()).to(real.to_complex())
    g = torch.stack([theta.cos(), theta.sin()], dim=-1).flatten(-2).to(dtype)
    by_frequency = torch.arange(dim).view(2, dim // 2).T.reshape(-1)
    return turn, g, by_frequency


def rel_shift(x: torch.Tensor, klen: int) -> torch.Tensor:
    """[.., qlen, W] scores against distances klen, klen - 1, ... (W of them) -> a
    view [.., qlen, klen] with out[i, j] = x[i, j + qlen - i], i.e. distance
    (klen - qlen) + i - j (Dai et al. 2019, App. B; XLNet's rel_shift_bnij, read
    through strides instead of copied). With W = klen + qlen (distances down to
    -(qlen - 1)) every entry is exact; with W = klen + 1 (down to 0) the entries of
    keys after their query read other scores, which causal attention masks."""
    *lead, qlen, width = x.shape
    if width not in (klen + 1, klen + qlen):
        raise ValueError(f"rel_shift: width {width}; accepted: klen + 1 or klen + qlen")
    x = x.contiguous()
    stride = (*x.stride()[:-2], width - 1, 1)
    return x.as_strided((*lead, qlen, klen), stride, x.storage_offset() + qlen)


def segment_starts(positions: torch.Tensor, segment_len: int) -> torch.Tensor:
    """The first position of each position's segment."""
    return positions - positions % segment_len


@register
class XL(Mechanism):
    name = "xl"
    small: ClassVar[dict] = {"segment_len": 16, "mem_len": 12, "clamp_len": 20}
    Config = XLConfig
    citation = "Dai et al. 2019, Transformer-XL (Sec. 3.2 recurrence, Sec. 3.3 relative positions)"
    summary = "its segment (causal) plus a memory of the M previous positions; relative positions"
    complexity = "O(N (M + L)) time and memory"
    oracle_summary = (
        "dense softmax with bias u.k_j + (q_i + v).W_R R_(i-j) built pair by pair, "
        "0/-inf segment+memory mask, stop-gradient on memory pairs"
    )

    def learnable(self, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
        """u, v [H, D] and W_R [H, D, D'] (D' = D rounded up to even), N(0, 1/D) from
        ``seed`` in float32 whatever torch's default dtype."""
        g = torch.Generator().manual_seed(self.config.seed)
        u, vb = (torch.randn(heads, head_dim, generator=g, dtype=torch.float32) * head_dim**-0.5
                 for _ in range(2))  # fmt: skip
        w_r = torch.randn(heads, head_dim, head_dim + head_dim % 2, generator=g,
                          dtype=torch.float64) * head_dim**-0.5  # fmt: skip
        return {"u": u, "v": vb, "w_r": w_r.float()}

    def plan(self, q, k, v, causal: bool, params: dict | None = None) -> XLPlan:
        cfg = self.config
        if cfg.segment_len < 1 or cfg.mem_len < 0:
            raise ValueError("xl: segment_len must be >= 1 and mem_len >= 0")
        if cfg.same_length and cfg.mem_len < 1:
            raise ValueError("xl: same_length needs mem_len >= 1 (each query sees M keys)")
        heads, dim = q.shape[1], q.shape[3]
        params = params or on_device(q.device, lambda: self.learnable(heads, dim), self.name,
                                     cfg, heads, dim)  # fmt: skip
        u, vb, w_r = params["u"], params["v"], params["w_r"].double()
        if tuple(u.shape) != (heads, dim) or tuple(w_r.shape[:2]) != (heads, dim):
            raise ValueError(
                f"xl: parameters for {tuple(u.shape)} heads x dim, inputs have ({heads}, {dim})"
            )
        max_dist = cfg.mem_len + cfg.segment_len
        dist = torch.arange(-max_dist, max_dist + 1, device=w_r.device)
        if cfg.clamp_len is not None and cfg.clamp_len > 0:
            dist = dist.clamp(-cfg.clamp_len, cfg.clamp_len)
        rel = torch.einsum("hdp,np->hnd", w_r, sinusoid(dist, dim + dim % 2))
        real = torch.float64 if u.dtype == torch.float64 else torch.float32
        n = q.shape[2]
        device = q.device
        return XLPlan(
            q.shape[0], heads, n, n, causal, cfg.segment_len, cfg.mem_len, cfg.same_length,
            u.to(device), vb.to(device), rel.to(real).to(device), max_dist,
            w_r.to(real).to(device), cfg.clamp_len,
        )  # fmt: skip

    def scaled(self, q, k, plan: XLPlan, factor: float):
        """Every score term has a k or a W_R R factor: scale k, the table and W_R."""
        return q, k * factor, dataclasses.replace(plan, rel=plan.rel * factor,
                                                  w_r=plan.w_r * factor)  # fmt: skip

    def visible(self, plan: XLPlan, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Pair visibility from positions (broadcasting): memory + segment (+ causal)."""
        start = segment_starts(i, plan.segment_len)
        vis = (j >= start - plan.mem_len) & (j >= 0)
        vis &= (j <= i) if plan.causal else (j < start + plan.segment_len)
        if plan.same_length:
            vis &= i - j < plan.mem_len
        return vis

    def oracle(self, q, k, v, plan: XLPlan, rows):
        i = rows.to(q.device)[:, None]
        j = torch.arange(plan.n_k, device=q.device)[None, :]
        vis = self.visible(plan, i, j)
        memory = j < segment_starts(i, plan.segment_len)  # stop-gradient pairs
        q64, k64 = q[:, :, rows.to(q.device)].double(), k.double()
        u, vb, rel = plan.u.double(), plan.v.double(), plan.rel.double()
        # u . k_j, with memory keys detached
        uk = torch.einsum("hd,bhjd->bhj", u, k64)[:, :, None, :]
        uk = torch.where(memory, torch.einsum("hd,bhjd->bhj", u, k64.detach())[:, :, None], uk)
        # (q_i + v) . W_R R_(i-j): every distance once, then picked pair by pair
        qr = torch.einsum("bhrd,hnd->bhrn", q64 + vb[None, :, None, :], rel)
        # (pairs farther apart than any visible one are masked below)
        index = (i - j).clamp(-plan.max_dist, plan.max_dist) + plan.max_dist
        relative = qr.gather(-1, index.expand(*qr.shape[:2], -1, -1))
        bias = (uk + relative) * q.shape[-1] ** -0.5
        bias = torch.where(vis, bias, -torch.inf)
        return [oracle.Term(bias, stop_grad=memory, keep=plan.keep)]


@XL.implementation("reference")
def xl_reference(mech, q, k, v, plan: XLPlan) -> torch.Tensor:
    """Segments a chunk at a time (:func:`~attn_zoo.tiles.chunks`): [memory | segment]
    keys per segment, AC + shifted BD."""
    n, seg, mem = plan.n_q, plan.segment_len, plan.mem_len
    klen, scale = mem + seg, q.shape[-1] ** -0.5
    # W_R R_d for d = klen .. 0 (causal) or .. -(L - 1): (q + v) . it, shifted into key order
    nearest = 0 if plan.causal else -(seg - 1)
    distances = torch.arange(klen, nearest - 1, -1, device=q.device)
    rel = plan.rel_at(distances).transpose(-2, -1)[:, None]

    def segments(q, k, v, qi):  # qi [s, L]: s segments
        ki = window(qi[:, 0] - mem, klen, n)  # [s, M + L]: memory, then the segment
        mem_i, cur_i = as_tiles(ki[:, :mem]), as_tiles(ki[:, mem:])
        kg = torch.cat([gather(k.detach(), mem_i), gather(k, cur_i)], dim=-2)
        vg = torch.cat([gather(v.detach(), mem_i), gather(v, cur_i)], dim=-2)
        qg = upcast(gather(q, as_tiles(qi)))  # [B, H, s, L, D]
        qv = (qg + plan.v[:, None, None, :].to(qg.dtype)) * scale
        vis = mech.visible(plan, qi[:, :, None], ki[:, None, :]) & (qi[:, :, None] >= 0)
        qu = qg + plan.u[:, None, None, :].to(qg.dtype)
        keep = key_mask(plan.keep, as_tiles(ki))
        # the BD term is built in the call, so attend frees it once added to the scores
        return attend(qu, kg, vg, vis, bias=rel_shift(qv @ rel.to(qg.dtype), klen), keep=keep,
                      need_lse=False)[0]  # fmt: skip

    qi = blocks(n, seg, q.device)  # [S, L]
    out = [run_chunk(segments, q, k, v, qi[part]) for part in chunks(len(qi), seg, klen, q)]
    return scatter(torch.cat(out, dim=2), as_tiles(qi), n).to(q.dtype)


@XL.implementation("triton", **triton_options("relative"))
def xl_triton(mech, q, k, v, plan: XLPlan) -> torch.Tensor:
    """Segment window + the relative term inside the kernel as feature products
    (:func:`relative_terms`; kernels/memory.py)."""
    from attn_zoo.kernels.memory import xl_attention

    return xl_attention(q, k, v, plan, relative_terms(q, plan))


@XL.implementation("flex", **flex_options(differentiable=False))
def xl_flex(mech, q, k, v, plan: XLPlan) -> torch.Tensor:
    """(q + u) as the query; the relative term as a score_mod reading a table of
    (q_i + v) . W_R R_t over the T distances a visible pair can have: [B, H, N, T],
    T <= M + 2L - 1, the memory price of stating XL in FlexAttention. Memory keys
    are not detached here, so it is registered without a backward pass."""
    seg, mem, causal = plan.segment_len, plan.mem_len, plan.causal
    nearest = 0 if causal else -(seg - 1)
    farthest = mem - 1 if plan.same_length else mem + seg - 1
    rel = plan.rel_at(torch.arange(nearest, farthest + 1, device=q.device))  # [H, T, D]
    qv = q.float() + plan.v[:, None, :].float()
    table = torch.einsum("bhnd,htd->bhnt", qv, rel.float()) * q.shape[-1] ** -0.5
    last = table.shape[-1] - 1

    def relative(score, b, h, i, j):
        return score + table[b, h, i, (i - j - nearest).clamp(0, last)]

    def segment_and_memory(b, h, i, j):
        start = i - i % seg
        vis = (j >= start - mem) & ((j <= i) if causal else (j < start + seg))
        return vis & (i - j < mem) if plan.same_length else vis

    qu = (q.float() + plan.u[:, None, :].float()).to(q.dtype)
    return flex(qu, k, v, segment_and_memory, relative, keep=plan.keep, need_lse=False,
                gpu_options=TABLE_STAGES)[0]  # fmt: skip


#: FlexAttention's kernel reads the table in [BLOCK_M, BLOCK_N] float32 tiles beside K
#: and V, buffered per stage: on an H100 (torch 2.11, fp16 and bf16 at head_dim 64:
#: 128 x 128 tiles, 3 stages) it asked for 245,760 bytes of shared memory, above the
#: 232,448 there are, and failed. Two stages need at least one K tile (16 KiB) less.
TABLE_STAGES = {"num_stages": 2}
