"""Where a call's time goes: the device's kernels, or the host that issues them.

For each mechanism and causality, a call of one implementation runs ``--calls`` times
in a loop, twice: with its plan made beforehand and with planning inside the call
(what a model's forward does). The loop is timed on its own (wall time per call,
synchronized at the end), then run again under ``torch.profiler``, which gives the
device time of every kernel the call launched (CUPTI, on CUDA) and the host's waits
in the CUDA runtime: stream and device synchronizations, and memory copies. A call
whose wall time is far above its device time is bound by its host; one whose device
time is mostly the flash core's kernels (``_flash``) is bound by them.

``python -m attn_zoo.bench.time_split [--impl triton] [--seq-len 8192] [--batch 4]
[--heads 8] [--head-dim 64] [--calls 20] [--mechanisms all] [--out FILE.csv]
[--host-top K]``; ``--host-top`` also names, per row, the K Python functions that
took the most host time (cProfile), where a host-bound call's time goes.

On a CPU, kernels are not device work: the device columns are 0 and the table says
only what the host did. Timings from a GPU machine (``scripts/gpu/session.sh
profile RUN``) are committed under ``results/``.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import functools
import pstats
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import attn_zoo

#: CUDA runtime and driver calls in which the host waits for the device.
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cuStreamSynchronize",
         "cuCtxSynchronize", "cudaEventSynchronize")  # fmt: skip
COPIES = ("cudaMemcpy", "cudaMemcpyAsync", "cuMemcpyHtoD", "cuMemcpyDtoH", "cuMemcpyAsync")


@dataclass(frozen=True)
class Split:
    mechanism: str
    causal: bool
    planning: bool  # the plan made inside each call
    wall_ms: float  # per call
    device_ms: float  # per call: kernels' time on the device
    flash_ms: float  # of which the flash core's
    kernels: float  # launched per call
    waits: float  # host synchronizations per call
    copies: float  # memory copies per call
    host_top: str = ""  # the Python functions that took the most host time (--host-top)
    status: str = "ok"  # or "failed: ..." (figures NaN), or "ok, no profile: ..."

    @property
    def host_bound(self) -> float:
        """Wall time over device time (inf when nothing ran on a device)."""
        return self.wall_ms / self.device_ms if self.device_ms else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def split(call: Callable[[], object], calls: int, device: torch.device) -> dict[str, float]:
    """Wall time of ``calls`` calls, then their kernels and waits under the profiler."""
    call()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    _sync(device)
    wall = (time.perf_counter() - start) * 1e3 / calls
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        with profile(activities=activities) as prof:
            for _ in range(calls):
                call()
            _sync(device)
    except RuntimeError as error:  # no profiler here (CUPTI): the wall time stands
        nan = float("nan")
        return {"wall_ms": wall, "device_ms": nan, "flash_ms": nan, "kernels": nan,
                "waits": nan, "copies": nan,
                "status": f"ok, no profile: {_short(error)}"}  # fmt: skip
    kernels = [e for e in prof.events() if e.device_type != DeviceType.CPU]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    flash = sum(e.time_range.elapsed_us() for e in kernels if "_flash" in e.name) / 1e3
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CPU]
    return {"wall_ms": wall, "device_ms": busy / calls, "flash_ms": flash / calls,
            "kernels": len(kernels) / calls,
            "waits": sum(name in WAITS for name in names) / calls,
            "copies": sum(name in COPIES for name in names) / calls}  # fmt: skip


def host_top(call: Callable[[], object], calls: int, top: int) -> str:
    """The ``top`` functions by their own host time over ``calls`` calls (cProfile),
    as "function (file:line) microseconds per call; ...": where a host-bound call's
    time goes, on the machine that is slow."""
    call()  # warm
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return "; ".join(f"{name} ({Path(file).name}:{line}) {own * 1e6 / calls:.0f} us"
                     for (file, line, name), (_, _, own, _, _) in ranked)  # fmt: skip


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


def time_split(name: str, impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               calls: int, top: int = 0) -> Iterator[Split]:  # fmt: skip
    """Both causalities of mechanism ``name``'s ``impl``, plan made before and inside,
    a row each as it is measured; with ``top``, each row names its ``top`` functions
    by host time (:func:`host_top`). A case that fails is a row with its status (its
    figures NaN), and the next case runs."""
    mech = attn_zoo.get(name)
    nan = float("nan")
    with torch.no_grad():
        for causal in (True, False):
            for planning in (False, True):
                try:
                    plan = None if planning else mech.plan(q, k, v, causal)
                    call = functools.partial(mech, q, k, v, causal, impl, plan)
                    where = host_top(call, calls, top) if top else ""
                    yield Split(name, causal, planning, **split(call, calls, q.device),
                                host_top=where)  # fmt: skip
                except Exception as error:  # a case's own failure (out of memory, ...)
                    yield Split(name, causal, planning, nan, nan, nan, nan, nan, nan,
                                status=f"failed: {_short(error)}")  # fmt: skip


class CsvRows:
    """The rows of a CSV file, each written (and flushed) as it comes, so that a run
    stopped at a time limit keeps what it measured."""

    columns = [f.name for f in fields(Split)] + ["host_bound"]

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, self.columns)
        self.writer.writeheader()

    def add(self, row: Split) -> None:
        self.writer.writerow(asdict(row) | {"host_bound": round(row.host_bound, 2)})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn_zoo.bench.time_split")
    parser.add_argument("--impl", default="triton")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--mechanisms", default="all", help="comma-separated, or all")
    parser.add_argument("--out", type=Path, help="also write the rows to this CSV")
    top = "name each row's K functions that took the most host time"
    parser.add_argument("--host-top", type=int, default=0, metavar="K", help=top)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        names = attn_zoo.registry.pick(args.mechanisms)
        for name in names:
            mech = attn_zoo.get(name)
            why = mech.impl(args.impl).unavailable(device)
            if why is not None:
                raise ValueError(f"{name}/{args.impl} cannot run on {device.type}: {why}")
    except (ValueError, KeyError) as error:
        print(f"time_split: {str(error).strip(chr(39))}")
        return 2
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    print(f"{args.impl} on {device.type}, {list(shape)} {str(dtype).removeprefix('torch.')}, "
          f"{args.calls} calls\n")  # fmt: skip
    print(
        "| mechanism | causal | planning | wall ms | device ms | flash ms | kernels | "
        "waits | copies | wall / device |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, out = [], CsvRows(args.out) if args.out is not None else None
    try:
        for name in names:
            for row in time_split(name, args.impl, q, k, v, args.calls, args.host_top):
                rows.append(row)
                if out is not None:
                    out.add(row)
                status = "" if row.status == "ok" else f" {row.status}"
                print(f"| {row.mechanism} | {'yes' if row.causal else 'no'} | "
                      f"{'inside' if row.planning else 'before'} | {row.wall_ms:.3f} | "
                      f"{row.device_ms:.3f} | {row.flash_ms:.3f} | {row.kernels:g} | "
                      f"{row.waits:g} | {row.copies:g} | {row.host_bound:.2f}{status} |",
                      flush=True)  # fmt: skip
    finally:
        if out is not None:
            out.close()
    for row in rows:
        if row.host_top:
            when = "inside" if row.planning else "before"
            print(f"\n{row.mechanism}, causal {row.causal}, plan {when}: {row.host_top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
