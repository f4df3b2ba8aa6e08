"""kernels/device_constants.py: host-made tensors kept on each device."""

import torch

from attn_zoo.kernels import device_constants
from attn_zoo.kernels.device_constants import moved, on_device


def test_made_once_per_key_and_device():
    made = []

    def make():
        made.append(1)
        return {"x": torch.arange(3), "pair": (2, torch.ones(2))}

    first = on_device("cpu", make, "test-made-once", 1)
    again = on_device(torch.device("cpu"), make, "test-made-once", 1)
    other = on_device("cpu", make, "test-made-once", 2)
    assert len(made) == 2 and again is first and other is not first
    meta = on_device("meta", make, "test-made-once", 1)
    assert len(made) == 3 and meta["x"].is_meta and meta["pair"][1].is_meta
    assert meta["pair"][0] == 2


def test_the_least_recently_used_go_past_the_byte_limit(monkeypatch):
    """Kept tensors stay under LIMIT_BYTES: the least recently used go first, and one
    larger than the limit is made and returned but not kept."""
    monkeypatch.setattr(device_constants, "LIMIT_BYTES", 2 * 4 * 10)  # two [10] float32
    monkeypatch.setattr(device_constants, "_KEPT", type(device_constants._KEPT)())
    for key in range(3):
        on_device("cpu", lambda: torch.zeros(10), "test-limit", key)
    on_device("cpu", lambda: torch.zeros(10), "test-limit", 1)  # used again: kept longer
    on_device("cpu", lambda: torch.zeros(10), "test-limit", 3)
    assert [index[0] for index in device_constants._KEPT] == [("test-limit", 1),
                                                              ("test-limit", 3)]  # fmt: skip
    big = on_device("cpu", lambda: torch.zeros(100), "test-limit", "big")
    assert big.numel() == 100 and len(device_constants._KEPT) == 2


def test_moved_keeps_the_containers():
    value = moved([torch.ones(1), {"a": (torch.zeros(1), "s")}], torch.device("meta"))
    assert isinstance(value, list) and value[0].is_meta and value[1]["a"][0].is_meta
    assert value[1]["a"][1] == "s"
