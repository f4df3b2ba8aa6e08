"""The float64 dense oracle (shared/DESIGN.md, "oracle").

Every mechanism's oracle is dense attention over all (query, key) pairs with an
explicit additive bias -- 0 / -inf masks, log of soft masks, log of
multiplicities, relative-position terms -- or a weighted sum of such dense
softmaxes. Mechanisms build their :class:`Term` lists pair by pair from the
plan; this module only evaluates them. Rows are independent, so large N is
checked on a recorded sample of query rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Term:
    """One dense softmax: ``weight * softmax(q k^T / sqrt(d) + bias) v``.

    Shapes broadcast against ``[batch, heads, rows, n_keys]``. ``k``/``v``
    replace the inputs' keys (compressed memories, shared QK); ``stop_grad``
    marks pairs whose key and value receive no gradient (recurrence memories);
    ``keep`` [batch, n_keys] (bool) hides padded keys.
    """

    bias: torch.Tensor
    weight: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    stop_grad: torch.Tensor | None = None
    keep: torch.Tensor | None = None


def sample_rows(n: int, max_rows: int | None, seed: int = 0) -> torch.Tensor:
    """All rows when ``n <= max_rows``, else a seeded sorted sample that keeps
    the first and last row (the edges where masks go wrong)."""
    if max_rows is None or n <= max_rows:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    inner = torch.randperm(n - 2, generator=g)[: max_rows - 2] + 1
    return torch.cat([torch.tensor([0, n - 1]), inner]).sort().values


def mask_bias(visible: torch.Tensor) -> torch.Tensor:
    """0 where visible, -inf elsewhere, in float64."""
    zero = torch.zeros((), dtype=torch.float64, device=visible.device)
    return torch.where(visible, zero, -torch.inf)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row with no finite score gives zeros."""
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top)
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(1e-300), torch.zeros_like(p))


def evaluate(q, k, v, terms: list[Term], rows: torch.Tensor) -> torch.Tensor:
    """Sum of the terms' dense softmaxes at query ``rows``, float64 ``[B, H, R, D]``."""
    q64 = q[:, :, rows.to(q.device)].double()
    scale = q.shape[-1] ** -0.5
    out = None
    for term in terms:
        k64 = (term.k if term.k is not None else k).double()
        v64 = (term.v if term.v is not None else v).double()
        scores = q64 @ k64.transpose(-2, -1)
        if term.stop_grad is not None:
            frozen = q64 @ k64.detach().transpose(-2, -1)
            scores = torch.where(term.stop_grad, frozen, scores)
        scores = scores * scale + term.bias
        if term.keep is not None:
            scores = scores.masked_fill(~term.keep.to(scores.device)[:, None, None, :], -torch.inf)
        p = _softmax(scores)
        if term.stop_grad is not None:
            part = (p * term.stop_grad) @ v64.detach() + (p * ~term.stop_grad) @ v64
        else:
            part = p @ v64
        if term.weight is not None:
            part = part * term.weight
        out = part if out is None else out + part
    return out


def causal_visible(rows: torch.Tensor, n_k: int, offset: int = 0) -> torch.Tensor:
    """[R, n_k] bool: key j visible to query i when j <= i + offset."""
    j = torch.arange(n_k, device=rows.device)
    return j[None, :] <= rows[:, None] + offset


def dense(q, k, v, causal: bool, rows: torch.Tensor) -> torch.Tensor:
    """Plain dense attention (causal if asked: the queries are the last positions)
    at ``rows`` in float64: the ``err_dense`` baseline."""
    offset = k.shape[2] - q.shape[2]
    bias = mask_bias(causal_visible(rows, k.shape[2], offset)) if causal else torch.zeros(())
    return evaluate(q, k, v, [Term(bias.to(q.device))], rows)


def count_visible(terms_at, n_q: int, batch: int, heads: int, chunk: int = 256) -> int:
    """(query, key) pairs with a finite bias, summed over terms, batch and
    heads; ``terms_at(rows)`` gives the oracle's terms at those query rows."""
    total = 0
    for start in range(0, n_q, chunk):
        rows = torch.arange(start, min(start + chunk, n_q))
        for term in terms_at(rows):
            finite = torch.isfinite(term.bias)
            finite = finite.view((1,) * (4 - finite.dim()) + tuple(finite.shape))
            repeat = (batch // finite.shape[0]) * (heads // finite.shape[1])
            total += int(finite.sum()) * repeat
    return total


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are 0)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num
