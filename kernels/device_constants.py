"""Tensors made on the host once and kept on each device.

A plan given no parameters draws its seeded ones (xl's u, v and W_R, lsh's rotations,
routing's centroids, compressive's convolutions) on the host, so that a seed gives
the same values on every device, and a mechanism's fixed tables (compressive's slots,
adaptive span's spans) are host data too. Copied to a GPU on every call, each copy
of host memory waits for the stream: the host stops issuing work until the GPU has
finished the previous call. :func:`on_device` makes each once per key and device.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")

#: Entries kept (least recently used dropped first).
LIMIT = 64
_KEPT: OrderedDict[tuple, object] = OrderedDict()


def moved(value, device: torch.device):
    """``value`` with every tensor in it (alone, or in a dict, tuple or list) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {name: moved(x, device) for name, x in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(moved(x, device) for x in value)
    return value


def on_device(device: torch.device | str, make: Callable[[], T], *key: Hashable) -> T:
    """``make()`` moved to ``device``, made once per ``key`` (which must name
    everything ``make`` depends on) and device. The tensors are shared between
    callers: read them, never write to them."""
    device = torch.device(device)
    index = (key, device)
    if index in _KEPT:
        _KEPT.move_to_end(index)
        return _KEPT[index]
    value = moved(make(), device)
    _KEPT[index] = value
    if len(_KEPT) > LIMIT:
        _KEPT.popitem(last=False)
    return value
