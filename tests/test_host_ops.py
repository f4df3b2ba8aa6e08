"""bench/host_ops.py: the host work of a triton forward, counted without a GPU."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attn_zoo
from attn_zoo.bench import host_ops


def test_lsh_builds_its_rounds_together():
    """lsh's rounds share one sort and one layout (kernels/grouped.py): its host
    synchronizations do not grow with the rounds (there are none), and each further
    round adds only its launch's arguments. Built round by round (before), 4 rounds
    took 13 synchronizations and about 590 operations at N = 8,192."""
    q = torch.randn(1, 2, 256, 32)
    one, eight = (host_ops.host_work(attn_zoo.get("lsh", n_hashes=r, bucket_size=16), q, True)
                  for r in (1, 8))  # fmt: skip
    assert (one.launches, eight.launches) == (1, 8)
    assert one.syncs == eight.syncs == 0
    assert eight.ops - one.ops <= 7 * 20, (one, eight)


def test_lsh_plans_as_a_gpu_does_with_nothing_outside_its_hashing_kernel():
    """Plans are counted as a GPU makes them: lsh's is one hashing kernel there
    (kernels/hashing.py), computed on the host in the dry run but not counted; per
    round in PyTorch (before) it was 65 operations and 2,266 MB at [4, 8, 8192, 64]."""
    q = torch.randn(1, 2, 256, 32)
    work = host_ops.host_work(attn_zoo.get("lsh", bucket_size=16), q, True)
    assert (work.plan_ops, work.plan_syncs, work.plan_megabytes) == (0, 0, 0.0), work
    other = q.to(torch.float64)  # the kernel reads at most float32: hashed per round
    assert host_ops.host_work(attn_zoo.get("lsh", bucket_size=16), other, True).plan_ops > 0


def test_grouped_layouts_wait_for_nothing():
    """lsh's and causal routing's layouts, built per call from their groups, are sized
    on the host (kernels/layout.py, ``BlockLayout.bound``): no synchronization per
    call. Before, 4 and 3 (each list's width, its runs, the round codes' range)."""
    q = torch.randn(1, 2, 256, 32)
    for name, config in (("lsh", {"bucket_size": 16}), ("routing", {})):
        for causal in (True, False):
            work = host_ops.host_work(attn_zoo.get(name, **config), q, causal)
            assert work.syncs == 0, work


def test_a_cached_layout_costs_no_synchronization():
    """Dense attention's layout is cached per shape and tile: once warm, a call issues
    a handful of operations (its arguments and outputs) and never waits."""
    work = host_ops.host_work(attn_zoo.get("dense"), torch.randn(1, 2, 300, 32), True)
    assert work.syncs == 0 and work.launches == 1 and 0 < work.ops <= 12


def test_the_table_has_a_row_per_mechanism_and_causality(capsys):
    assert host_ops.main(["--seq-len", "256", "--batch", "1", "--heads", "2",
                          "--head-dim", "32", "--mechanisms", "dense,lsh"]) == 0  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 4 and rows[1].startswith("| dense | yes |")


def test_an_unknown_mechanism_is_refused_in_one_line(capsys):
    assert host_ops.main(["--mechanisms", "dense,nope"]) == 2
    out = capsys.readouterr().out
    assert (
        out.startswith("host_ops: unknown mechanism 'nope'; accepted: dense")
        and out.count("\n") == 1
    )


class _HostCopies(TorchDispatchMode):
    """Operations that make a tensor on the ``meta`` device from a host tensor: a
    plan on a GPU would copy host memory there, a copy that waits for the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = out if isinstance(out, (tuple, list)) else [out]
        to_meta = any(isinstance(x, torch.Tensor) and x.is_meta for x in made)
        if to_meta and any(isinstance(x, torch.Tensor) and x.device.type == "cpu" for x in args):
            self.found.append(str(func))
        return out


@pytest.mark.parametrize("name", attn_zoo.names())
def test_a_warm_plan_copies_nothing_from_the_host(name):
    """A plan made again on one device (as every call of a model or a timed loop
    does) copies no host tensor to it: seeded parameters, rotations, centroids and
    slot tables are made once per device (kernels/device_constants.py). Planned on
    ``meta`` tensors, where such a copy is an operation from a host tensor; before,
    xl's plan made 4 and lsh's, routing's and compressive's 1."""
    q = torch.randn(1, 2, 2048, 32, device="meta")
    mech = attn_zoo.get(name)
    for causal in (True, False):
        mech.plan(q, q, q, causal)
        with _HostCopies() as copies:
            mech.plan(q, q, q, causal)
        assert copies.found == [], (causal, copies.found)


def test_adaptive_span_makes_its_spans_tensor_once():
    """The triton call's spans z_h are a tensor kept on the device, not one made from
    the plan's values every call (1 before)."""
    work = host_ops.host_work(attn_zoo.get("adaptive_span"), torch.randn(1, 2, 256, 32), True)
    assert work.copies == 0 and work.plan_copies == 0, work


def test_memory_passes_outside_the_kernels():
    """Bytes the call's own operations read and write, besides the kernels: none for
    dense; for xl, its relative term's features in four passes over [B, H, N, D] (q + v,
    the product with W_R, the rotation as one complex product, the cast) and the
    content bias in two: about 10 q's worth (19 before, in 47 operations)."""
    q = torch.randn(1, 2, 512, 32)
    dense = host_ops.host_work(attn_zoo.get("dense"), q, True)
    xl = host_ops.host_work(attn_zoo.get("xl"), q, True)
    size = q.numel() * q.element_size() / 1e6
    assert dense.megabytes == 0
    assert 6 * size < xl.megabytes < 11 * size, xl.megabytes / size


def test_the_backward_of_dense_passes_over_memory_only_to_cast_dk_and_dv():
    """Dense's backward on fp16 inputs: D = rowsum(dO * O) is a kernel, dQ is written in
    q's dtype, so the only passes outside the three kernels are dK's and dV's casts
    from float32 (read 4 bytes, write 2, per element). Before, D took float32 copies of
    O and dO, a product and a sum, and dQ a cast too: 776 MB at [4, 8, 8192, 64]."""
    q = torch.randn(1, 2, 256, 32).half()
    work = host_ops.backward_work(attn_zoo.get("dense"), q, True)
    assert (work.launches, work.syncs) == (3, 0), work
    assert work.megabytes * 1e6 == 2 * q.numel() * (4 + 2), work


def test_the_backward_table_and_a_bad_dtype(capsys):
    assert host_ops.main(["--backward", "--mechanisms", "dense,sparse_fixed", "--seq-len", "256",
                          "--batch", "1", "--heads", "2", "--head-dim", "32"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| dense | yes |" in out and "| sparse_fixed | no |" in out
    assert host_ops.main(["--dtype", "half"]) == 2
    assert capsys.readouterr().out.strip() == (
        "host_ops: unknown dtype 'half'; accepted: float32, float16, bfloat16")  # fmt: skip


@pytest.mark.parametrize("name", ["lsh", "sparse_strided"])
def test_gathered_backwards_put_their_rows_at_their_positions(name):
    """lsh's rounds and the strided columns: each backward kernel puts its rows at their
    positions, adding to the parts' before it, so what is left outside the kernels is
    casting dQ, dK and dV from float32. Before,
    each part's rows went through a kernel-order buffer, ``zeros`` and ``scatter_add``:
    lsh 4,568 MB at [4, 8, 8192, 64] fp16, now 302."""
    q = torch.randn(1, 2, 256, 32).half()
    work = host_ops.backward_work(attn_zoo.get(name), q, True)
    assert work.syncs == 0 and work.megabytes * 1e6 <= 3 * q.numel() * (4 + 2), work
