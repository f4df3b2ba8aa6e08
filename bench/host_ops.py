"""What each mechanism's triton forward asks of the host besides its kernels.

On a GPU every aten operation is a launch the host issues (some microseconds each)
and every synchronization (``int(t)``, ``bool(t)``, ``t.item()``) waits for the queue
to drain, so a call that issues hundreds of them is bound by its host, whatever its
kernels cost. This counts both, without a GPU: each mechanism's ``triton`` impl runs
on the CPU inside :func:`~attn_zoo.kernels.dry_run.recorded` (no kernel launches,
the GPU's tiles), its plan made beforehand and its cached layouts warm, as a timed
call of the harness runs it; then each recorded launch's arguments are built as
:func:`~attn_zoo.kernels.flash.launch` builds them. Operations are counted at
PyTorch's dispatcher (``TorchDispatchMode``), synchronizations as
``aten._local_scalar_dense`` (a tensor's value read on the host). The plan's own work
is counted apart. Everything runs on the CPU here, so two things read differently
on a GPU: a value read from a tensor the mechanism keeps on the host waits for
nothing there, and a copy of host data to the device waits for the queue there.
Tensors made from host values (``torch.tensor(list)``) are counted apart, as
``host copies``; a host tensor moved with ``.to(device)`` is a copy there but no
operation here (the tests see those by planning on the ``meta`` device). Plans
and calls are counted warm: the second of each, as in a timed loop. Plans are made
inside the recording too, so they take the GPU's path (lsh's hashing kernel, one
launch there, counted as none).

``--backward`` counts the backward instead (:func:`backward_work`): each recorded
call's gradients through :func:`~attn_zoo.kernels.autograd.gradients` with its
kernels not run, on q, k and v three tensors (as a model's projections are), the
output, statistics and upstream gradient stand-ins made beforehand.

``python -m attn_zoo.bench.host_ops [--seq-len 8192] [--batch 4] [--heads 8]
[--head-dim 64] [--dtype float32] [--mechanisms all] [--backward]`` prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attn_zoo
from attn_zoo.kernels import flash_backward
from attn_zoo.kernels.autograd import STAND_IN, gradients, leaves_of
from attn_zoo.kernels.dry_run import recorded
from attn_zoo.kernels.flash import launch, new_output, output_rows

SYNC = torch.ops.aten._local_scalar_dense.default
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: A tensor made from host values (``torch.tensor(list)``): on a GPU, a copy that waits.
FRESH = torch.ops.aten.lift_fresh.default


def _tensors(values) -> list[torch.Tensor]:
    """The tensors among ``values``, and in the lists and tuples among them."""
    return [x for x in tree_leaves(values) if isinstance(x, torch.Tensor)]


def _aliases(name: str, inputs: list[torch.Tensor], out) -> bool:
    """Whether an operation that is not in place returned its input's memory (a view
    by another name, such as ``_unsafe_view``)."""
    if name.split(".")[0].endswith("_"):
        return False
    held = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    return any(t.untyped_storage().data_ptr() in held for t in _tensors([out]) if t.numel())


class _Counter(TorchDispatchMode):
    """Counts the aten operations dispatched inside, the synchronizations, the
    tensors made from host values, and the bytes the operations that are neither
    views nor allocations read and write (their tensors' sizes: on a GPU each such
    operation is a pass over memory, outside the flash kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = self.copies = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if STAND_IN.get():  # a kernel's work, done on the host in a dry run: not counted
            return func(*args, **(kwargs or {}))
        self.ops += 1
        self.syncs += func is SYNC
        self.copies += func is FRESH
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        allocates = name.startswith(("empty", "new_empty"))  # writes nothing
        makes = name.startswith("new_") or "_like" in name  # reads only its input's shape
        inputs = _tensors([*args, *(kwargs or {}).values()])
        if (
            not getattr(func, "is_view", False)
            and not allocates
            and not _aliases(name, inputs, out)
        ):
            moved = _tensors([out]) + ([] if makes else inputs)
            self.bytes += sum(t.numel() * t.element_size() for t in moved)
        return out


@dataclass(frozen=True)
class HostWork:
    mechanism: str
    causal: bool
    ops: int  # per call, its plan made beforehand
    syncs: int
    plan_ops: int
    plan_syncs: int
    launches: int
    copies: int = 0  # tensors made from host values
    plan_copies: int = 0
    megabytes: float = 0.0  # read and written by the call's operations
    plan_megabytes: float = 0.0


def _call(mech, q: torch.Tensor, plan) -> tuple[int, int]:
    """One call of ``mech``'s triton forward on q = k = v with its kernels recorded, then
    each recorded launch's arguments and outputs built, as the forward builds them.
    Returns the launches, and the bytes of the zeros the recording returned in place
    of each output and log-sum-exp (written by the kernels on a GPU, not by an
    operation)."""
    with recorded() as calls:
        mech.impl("triton").run(mech, q, q, q, plan)
    stand_ins = 0
    for query, parts in calls:
        rows = output_rows(query, parts[0])
        out = new_output(query, (*query.shape[:2], rows, query.shape[3]), query.dtype)
        stand_ins += out.numel() * out.element_size() + out.numel() // out.shape[-1] * 4
        for part in parts:
            launch(query, part, out)
    return sum(len(parts) for _, parts in calls), stand_ins


def host_work(mech, q: torch.Tensor, causal: bool) -> HostWork:
    """The host work of one call of mechanism ``mech``'s triton forward on q = k = v."""
    with torch.no_grad():
        with recorded():  # plans as on a GPU (lsh hashes in one kernel there)
            warm = mech.plan(q, q, q, causal)
        _call(mech, q, warm)  # warm: cached layouts and constants
        with _Counter() as planning, recorded():
            plan = mech.plan(q, q, q, causal)
        with _Counter() as call:
            launches, stand_ins = _call(mech, q, plan)
    return HostWork(mech.name, causal, call.ops, call.syncs, planning.ops, planning.syncs,
                    launches, call.copies, planning.copies, (call.bytes - stand_ins) / 1e6,
                    planning.bytes / 1e6)  # fmt: skip


#: The backward's kernels (module attributes of :mod:`attn_zoo.kernels.flash_backward`).
BACKWARD_KERNELS = ("_row_dots", "_flash_bwd_dq", "_flash_bwd_dkdv")


class _NotRun:
    """A kernel whose launches are counted and not run (``kernel[grid](...)``)."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def launched(*args, **kwargs) -> None:
            self.launches += 1

        return launched


@contextlib.contextmanager
def _backward_kernels_not_run() -> Iterator[list[_NotRun]]:
    stubs = {name: _NotRun() for name in BACKWARD_KERNELS}
    kept = {name: getattr(flash_backward, name) for name in stubs}
    for name, stub in stubs.items():
        setattr(flash_backward, name, stub)
    try:
        yield list(stubs.values())
    finally:
        for name, kernel in kept.items():
            setattr(flash_backward, name, kernel)


@dataclass(frozen=True)
class BackwardWork:
    mechanism: str
    causal: bool
    ops: int
    syncs: int
    launches: int
    megabytes: float


def backward_work(mech, q: torch.Tensor, causal: bool) -> BackwardWork:
    """The host work of the backward of one call of ``mech``'s triton forward on q and
    copies of it as k and v: every recorded call's :func:`gradients`, its kernels not
    run, warm (the second time), with stand-ins for the forward's output, statistics
    and the upstream gradients made outside the count."""
    k, v = q.clone(), q.clone()
    with torch.no_grad(), recorded() as calls:
        plan = mech.plan(q, k, v, causal)
        mech.impl("triton").run(mech, q, k, v, plan)
    inputs = []
    for query, parts in calls:
        shape = (*query.shape[:2], output_rows(query, parts[0]))
        out = torch.zeros(*shape, query.shape[3], dtype=query.dtype)
        stats = (torch.zeros(shape), torch.zeros(shape))
        inputs.append((query, parts, leaves_of(query, parts), out, stats, torch.ones_like(out),
                       torch.zeros(shape)))  # fmt: skip
    with torch.no_grad(), _backward_kernels_not_run() as kernels:
        for args in inputs:  # warm: cached key-major layouts
            gradients(*args)
        warm = sum(kernel.launches for kernel in kernels)
        with _Counter() as count:
            for args in inputs:
                gradients(*args)
    launches = sum(kernel.launches for kernel in kernels) - warm
    return BackwardWork(mech.name, causal, count.ops, count.syncs, launches,
                        count.bytes / 1e6)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn_zoo.bench.host_ops")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="of " + ", ".join(DTYPES))
    parser.add_argument("--mechanisms", default="all", help="comma-separated, or all")
    parser.add_argument("--backward", action="store_true", help="count the backward's work")
    args = parser.parse_args(argv)
    try:
        names = attn_zoo.registry.pick(args.mechanisms)
    except ValueError as error:
        print(f"host_ops: {error}")
        return 2
    if args.dtype not in DTYPES:
        print(f"host_ops: unknown dtype {args.dtype!r}; accepted: {', '.join(DTYPES)}")
        return 2
    q = torch.randn(args.batch, args.heads, args.seq_len, args.head_dim).to(DTYPES[args.dtype])
    shape = f"[{args.batch}, {args.heads}, {args.seq_len}, {args.head_dim}] {args.dtype}"
    if args.backward:
        print(f"host work per triton backward, {shape} (kernels not run; MB: read and "
              "written by the aten operations that are not views)\n")  # fmt: skip
        print("| mechanism | causal | aten ops | host syncs | MB | launches |")
        print("|---|---|---|---|---|---|")
        for name in names:
            for causal in (True, False):
                w = backward_work(attn_zoo.get(name), q, causal)
                print(f"| {w.mechanism} | {'yes' if causal else 'no'} | {w.ops} | {w.syncs} | "
                      f"{w.megabytes:.0f} | {w.launches} |")  # fmt: skip
        return 0
    print(f"host work per triton forward call, {shape} (kernels not run; MB: read and "
          "written by the aten operations that are not views)\n")  # fmt: skip
    print("| mechanism | causal | aten ops | host syncs | host copies | MB | launches | "
          "plan: ops | plan: syncs | plan: host copies | plan: MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for causal in (True, False):
            w = host_work(attn_zoo.get(name), q, causal)
            print(f"| {w.mechanism} | {'yes' if causal else 'no'} | {w.ops} | {w.syncs} | "
                  f"{w.copies} | {w.megabytes:.0f} | {w.launches} | {w.plan_ops} | "
                  f"{w.plan_syncs} | {w.plan_copies} | {w.plan_megabytes:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
