"""Tensors made on the host once and kept on each device.

A plan given no parameters draws its seeded ones (xl's u, v and W_R, lsh's rotations,
routing's centroids, compressive's convolutions) on the host, so that a seed gives
the same values on every device, and a mechanism's fixed tables (compressive's slots,
adaptive span's spans) are host data too. Copied to a GPU on every call, each copy
of host memory waits for the stream: the host stops issuing work until the GPU has
finished the previous call. :func:`on_device` makes each once per key and device.
xl's tables of the positions (:func:`attn_zoo.xl.relative_terms`) are kept the same
way, made once per length instead of in passes over memory every call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch.utils._pytree import tree_leaves, tree_map_only

T = TypeVar("T")

#: Bytes of tensors kept, over every device (least recently used dropped first): a
#: model whose length changes every batch keeps the latest lengths' tables, not all.
LIMIT_BYTES = 256 * 2**20
_KEPT: OrderedDict[tuple, tuple[object, int]] = OrderedDict()


def moved(value, device: torch.device):
    """``value`` with every tensor in it (alone, or in a dict, tuple or list) on ``device``."""
    return tree_map_only(torch.Tensor, lambda t: t.to(device), value)


def size(value) -> int:
    """Bytes of the tensors in ``value`` (as :func:`moved` walks it)."""
    return sum(t.nbytes for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def on_device(device: torch.device | str, make: Callable[[], T], *key: Hashable) -> T:
    """``make()`` moved to ``device``, made once per ``key`` (which must name
    everything ``make`` depends on) and device while it stays among the
    :data:`LIMIT_BYTES` most recently used. The tensors are shared between callers:
    read them, never write to them."""
    device = torch.device(device)
    index = (key, device)
    if index in _KEPT:
        _KEPT.move_to_end(index)
        return _KEPT[index][0]
    value = moved(make(), device)
    bytes_ = size(value)
    if bytes_ <= LIMIT_BYTES:
        _KEPT[index] = (value, bytes_)
        while sum(kept for _, kept in _KEPT.values()) > LIMIT_BYTES:
            _KEPT.popitem(last=False)
    return value
