"""What every peer wrapper shares: the package check, seeded random draws, and
the refusals of what a package cannot express."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from attn_zoo.validation import Unsupported


@functools.cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as error:  # an installed package can fail to import, too
        return f"{type(error).__name__}: {error}"
    return None


def peer_options(*packages: tuple[str, str], variant: Callable) -> dict:
    """``Mechanism.implementation`` options of a peer built on ``packages``
    ((import name, pip name) pairs): unavailable while one of them does not import,
    never in the default sweep, differentiable wherever it runs (plain torch)."""

    def unavailable(device: torch.device) -> str | None:
        for module, pip_name in packages:
            why = _import_error(module)
            if why:
                return (f"peer package {pip_name} does not import ({why}); "
                        f"install it with: pip install 'attn-zoo[peers]'")  # fmt: skip
        return None

    return dict(unavailable=unavailable, default_on=lambda device: False, variant=variant)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The package's own random draws (rotations, centroids) from ``seed``, without
    touching the caller's random state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def refuse_padding(plan, who: str) -> None:
    """Peers take no key-padding mask through this interface: refuse, never ignore."""
    if plan.keep is not None:
        raise Unsupported(f"{who}: key padding is not passed to the peer package; "
                          "run it without key_padding")  # fmt: skip


def heads_as_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B * H, N, D], the layout of packages that fold heads into batch."""
    return x.reshape(-1, *x.shape[2:])


def local_windows(q, k, v, window: int, **options) -> torch.Tensor:
    """local-attention's ``LocalAttention`` over windows of ``window`` (``options``: its
    causal / look_backward / look_forward / exact_windowsize), padded to whole windows
    with the padding keys masked (its autopad leaves them visible otherwise)."""
    from local_attention import LocalAttention

    attention = LocalAttention(window_size=window, autopad=True, **options)
    n = k.shape[2]
    real = torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device) if n % window else None
    return attention(q, k, v, mask=real)
