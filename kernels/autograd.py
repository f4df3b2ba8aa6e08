"""The flash core as a ``torch.autograd.Function``: the forward kernel, then the
FlashAttention-2 backward of :mod:`attn_zoo.kernels.flash_backward`.

:func:`attend` is what the mechanism families call. It returns (out, lse) for
the parts merged by log-sum-exp, differentiable in q and in every tensor a part
reads (:meth:`~attn_zoo.kernels.flash.Part.differentiable`: keys, values, the
query features of a relative term, the adaptive-span spans z_h). Without
a tensor that needs a gradient it is the forward alone.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import torch

from attn_zoo.kernels.flash import Part, forward, forward_with_stats, output_rows, row_lse
from attn_zoo.kernels.flash_backward import backward


class FlashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, parts: Sequence[Part], q: torch.Tensor, *leaves: torch.Tensor):
        out, row_max, row_logsum = forward_with_stats(q, parts)
        ctx.save_for_backward(out, row_max, row_logsum)
        ctx.parts, ctx.q, ctx.leaves = parts, q, leaves
        return out, row_lse(row_max, row_logsum)

    @staticmethod
    def backward(ctx, dout: torch.Tensor, dlse: torch.Tensor):
        out, row_max, row_logsum = ctx.saved_tensors
        stats = (row_max, row_logsum)
        return None, *gradients(ctx.q, ctx.parts, ctx.leaves, out, stats, dout, dlse)


def leaves_of(q: torch.Tensor, parts: Sequence[Part]) -> list[torch.Tensor]:
    """The tensors besides q that the parts read differentiably, each once."""
    leaves: list[torch.Tensor] = []
    for part in parts:
        for tensor in part.differentiable():
            if tensor is not q and all(tensor is not seen for seen in leaves):
                leaves.append(tensor)
    return leaves


def gradients(q, parts, leaves, out, stats, dout, dlse) -> list[torch.Tensor | None]:
    """The gradients of q and of each leaf in its own dtype (None where no pair reaches
    it), from :func:`~attn_zoo.kernels.flash_backward.backward`."""
    grads = backward(q, parts, out, stats, dout, dlse)
    return [None if id(t) not in grads else grads[id(t)].to(t.dtype) for t in (q, *leaves)]


#: Set inside :func:`attn_zoo.kernels.dry_run.dry_run`: where :func:`attend` records
#: its calls instead of launching.
RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("recording", default=None)
#: Set while a dry run computes on the host what a kernel computes on a GPU (lsh's
#: hashing, :mod:`attn_zoo.kernels.hashing`): counters of the host's work skip it.
STAND_IN: contextvars.ContextVar[bool] = contextvars.ContextVar("stand_in", default=False)


def attend(q: torch.Tensor, parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, n_out, D] in q's dtype, lse [B, H, n_out] float32) of ``parts``."""
    recording = RECORDING.get()
    if recording is not None:  # a dry run: what would launch, and zeros
        recording.append((q, tuple(parts)))
        n_out = output_rows(q, parts[0])
        lse = torch.zeros(*q.shape[:2], n_out, device=q.device)
        return q.new_zeros(*q.shape[:2], n_out, q.shape[3]), lse
    leaves = leaves_of(q, parts)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, *leaves)):
        return FlashFunction.apply(parts, q, *leaves)
    return forward(q, parts)
