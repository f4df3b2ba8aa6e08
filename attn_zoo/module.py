"""``attn_zoo.Attention``: a mechanism as an ``nn.Module`` that owns its
learnable tensors, for use inside a model.

    attn = attn_zoo.Attention("xl", num_heads=8, head_dim=64, segment_len=128, mem_len=128)
    out = attn(q, k, v, is_causal=True)          # the arguments of attn_zoo.attention

Parameters (``nn.Parameter``, trained by the model's optimizer):

* xl: ``u``, ``v`` [H, D] and ``w_r`` [H, D, D'] (Dai et al. 2019, Sec. 3.3);
* compressive with ``compression="conv"``: ``conv_k``, ``conv_v`` [H, D, D, c];
  the paper trains them with :meth:`reconstruction_loss` (Rae et al. 2019, Alg. 1);
* adaptive_span: ``spans`` z_h [H], clamped to [0, S] in use, with the paper's L1
  penalty :meth:`span_loss` (Sukhbaatar et al. 2019, Sec. 3.2).

Buffers (no gradient): routing's ``centroids`` [H, C, D] when ``n_clusters`` is
given; in training mode each forward moves them one online k-means step
toward the tokens routed to them (Roy et al. 2020, Sec. 4.1: an exponential
moving average with ``ema_decay``), outside gradient descent; in eval mode
they stay. lsh's rotations are drawn from ``seed`` at each call, since their
count follows the sequence length (n_buckets = 2N / m).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attn_zoo.functional import _causality_and_padding, attend
from attn_zoo.registry import get


class Attention(nn.Module):
    """One attention mechanism with its learnable tensors; ``forward`` takes the
    arguments of :func:`attn_zoo.attention` (SDPA's)."""

    def __init__(
        self,
        mechanism: str = "dense",
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        impl: str = "auto",
        **config: Any,
    ) -> None:
        super().__init__()
        self.mech = get(mechanism, **config)
        self.impl = impl
        self.num_heads, self.head_dim = num_heads, head_dim
        if num_heads is None or head_dim is None:
            if self.mech.learnable(1, 2) or self.mech.buffers(1, 2):
                raise ValueError(
                    f"attn_zoo.Attention({mechanism!r}) holds per-head tensors: pass "
                    f"num_heads= and head_dim="
                )
            return
        for name, value in self.mech.learnable(num_heads, head_dim).items():
            self.register_parameter(name, nn.Parameter(value))
        for name, value in self.mech.buffers(num_heads, head_dim).items():
            self.register_buffer(name, value)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """What ``plan`` receives: the parameters and the buffers."""
        return {**dict(self.named_parameters(recurse=False)),
                **dict(self.named_buffers(recurse=False))}  # fmt: skip

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: Any = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if self.num_heads is not None and q.shape[1] != self.num_heads:
            raise ValueError(
                f"attn_zoo.Attention({self.mech.name!r}) was built for {self.num_heads} heads, "
                f"q has {q.shape[1]}"
            )
        causal, keep = _causality_and_padding(attn_mask, is_causal, q, k)
        out = attend(self.mech, q, k, v, causal=causal, keep=keep, dropout_p=dropout_p,
                     scale=scale, enable_gqa=enable_gqa, impl=self.impl,
                     params=self.params)  # fmt: skip
        if self.training:
            with torch.no_grad():
                buffers = dict(self.named_buffers(recurse=False))
                for name, value in self.mech.updated_buffers(buffers, q).items():
                    buffers[name].copy_(value)
        return out

    def span_loss(self) -> torch.Tensor:
        """Sukhbaatar et al. 2019, Sec. 3.2: the L1 penalty (1 / H) sum_h z_h; the
        model's loss adds lambda times it."""
        if self.mech.name != "adaptive_span":
            raise ValueError(f"span_loss is adaptive_span's; this module is {self.mech.name}")
        return self.spans.clamp(0, self.mech.config.max_span).mean()

    def reconstruction_loss(self, q, old_k, old_v) -> torch.Tensor:
        """Rae et al. 2019: the attention-reconstruction loss that trains f_c, with
        queries and the evicted memories [B, H, *, D] detached."""
        from attn_zoo.compressive import attention_reconstruction_loss

        if self.mech.name != "compressive":
            raise ValueError(
                f"reconstruction_loss is compressive's; this module is {self.mech.name}"
            )
        cfg = self.mech.config
        weights = (self.conv_k, self.conv_v) if cfg.compression == "conv" else None
        return attention_reconstruction_loss(q, old_k, old_v, cfg.rate, cfg.compression, weights)

    def extra_repr(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in self.mech.describe().items() if k != "mechanism"
        )
        return f"{self.mech.name!r}, impl={self.impl!r}" + (f", {fields}" if fields else "")
