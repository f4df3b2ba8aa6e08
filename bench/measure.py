"""How the harness measures time and peak memory.

Time: ``warmup`` calls, then timed calls until there are at least ``repeats``
of them and they add up to at least ``min_time`` seconds (as Triton's
``do_bench`` and tritonbench repeat for a time budget); every sample is kept,
and the row reports the median with the 20th and 80th percentiles. On CUDA
each call is bracketed by device events, with the L2 cache flushed before it
(a 256 MiB buffer zeroed outside the timed region, as ``do_bench`` does), and
optionally replayed from a captured CUDA graph; on the CPU by
``time.perf_counter``. A ``setup`` step (the forward of a backward-only case)
runs before each timed call, untimed.

Peak memory, from a clean baseline taken just before one extra call:

* CUDA: the caching allocator's peak (``max_memory_allocated``) minus what was
  allocated before the call.
* CPU: the process's peak resident set size. Linux keeps it as ``VmHWM`` in
  ``/proc/self/status`` and resets it when ``5`` is written to
  ``/proc/self/clear_refs``. Before the call the harness returns freed heap
  pages to the OS (``malloc_trim``) and resets the peak; the figure is
  ``VmHWM`` after the call minus ``VmRSS`` before it, in a helper process whose
  glibc mmap threshold is 64 KiB from its start, so that tensors are mapped and
  unmapped on alloc/free instead of lingering in the heap
  (:mod:`attn_zoo.bench.peak_process`). Timed calls run in the sweep's process
  with the thresholds glibc's dynamic rule settles at (mmap 32 MiB, its ceiling;
  trim 64 MiB), so that a reference reusing chunk-sized temporaries is not
  charged a page fault per fresh page on every chunk, which no process outside a
  memory measurement pays. (One process cannot do both: once its heap holds freed
  chunks, later allocations reuse them whatever the threshold.) Where this is not
  possible (not Linux/glibc) the figure is left empty and the note says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples_ms: list[float]
    first_ms: float | None = None  # the first call, warm-up or not: compiles, caches, JIT

    def samples_text(self) -> str:
        """Every sample, space-separated (the results.csv column)."""
        return " ".join(f"{x:.6g}" for x in self.samples_ms)


def _percentile(sorted_xs: list[float], p: float) -> float:
    """Linear-interpolated percentile of an already sorted list."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = p * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    xs = sorted(samples_ms)
    return Timing(statistics.median(xs), _percentile(xs, 0.2), _percentile(xs, 0.8),
                  list(samples_ms))  # fmt: skip


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronization (a no-op on the CPU)."""
    if device.type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


#: What one L2 flush zeroes: larger than any current GPU's L2 (H100: 50 MiB).
L2_FLUSH_BYTES = 256 * 2**20
#: A budget never repeats more than this many calls (tiny kernels on a GPU).
MAX_REPEATS = 10_000


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    min_time: float = 0.0,
    *,
    setup: Callable[[], object] | None = None,
    cuda_graph: bool = False,
) -> Timing:
    """Every timed call's wall time (ms): at least ``repeats`` calls and at least
    ``min_time`` seconds of them; synchronized, L2-flushed on CUDA. ``first_ms`` is
    the wall time of the very first call (the first warm-up call, else the first
    timed one), which pays any compilation."""
    first = None
    for _ in range(warmup):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        synchronized(fn, device)()
        first = first if first is not None else (time.perf_counter() - t0) * 1e3
    if device.type == "cuda":
        samples = _cuda_samples(fn, device, repeats, min_time, setup, cuda_graph)
        return dataclasses.replace(summarize(samples), first_ms=first)
    samples: list[float] = []
    while len(samples) < repeats or (sum(samples) < min_time * 1e3 and len(samples) < MAX_REPEATS):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return dataclasses.replace(
        summarize(samples), first_ms=first if first is not None else samples[0]
    )


def _cuda_samples(fn, device, repeats, min_time, setup, cuda_graph) -> list[float]:
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    if cuda_graph:  # capture once (after the warm-up), time the replays
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()  # a side-stream warm-up, as torch's capture recipe asks
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    samples: list[float] = []
    while len(samples) < repeats or (sum(samples) < min_time * 1e3 and len(samples) < MAX_REPEATS):
        if setup is not None:
            setup()
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        samples.append(start.elapsed_time(end))
    return samples


def gpu_state(device: torch.device) -> dict:
    """The GPU's clocks, power limit and driver (nvidia-smi), and what torch
    reports of it: the conditions a GPU timing was taken under."""
    props = torch.cuda.get_device_properties(device)
    state: dict = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
    }
    fields = ("driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.limit", "power.draw", "temperature.gpu", "persistence_mode",
              "clocks_throttle_reasons.active")  # fmt: skip
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(fields)}",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        state["nvidia_smi"] = f"not available ({type(e).__name__})"
        return state
    values = [v.strip() for v in out.stdout.strip().split(",")]
    if out.returncode == 0 and len(values) == len(fields):
        state.update(zip(fields, values, strict=True))
    else:
        state["nvidia_smi"] = (out.stderr or out.stdout).strip()[:200]
    return state


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """The device's measured bf16 matrix-multiply rate: the roof that effective
    TFLOP/s are drawn against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    timing = time_call(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12


# -- peak memory -----------------------------------------------------------------
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: (mmap, trim) thresholds: every tensor mapped (a peak-memory call), and the steady
#: state of glibc's dynamic thresholds on 64-bit (timed calls).
MAPPED = (64 << 10, 128 << 10)
STEADY = (32 << 20, 64 << 20)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def use_thresholds(mmap_trim: tuple[int, int]) -> None:
    """Set glibc's (mmap, trim) thresholds for this process."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_trim[0])
        _LIBC.mallopt(_M_TRIM_THRESHOLD, mmap_trim[1])


_LIBC = _libc()
use_thresholds(STEADY)  # the peak-memory helper (bench/peak_process.py) sets MAPPED


def _status_bytes(key: str) -> int:
    with open(_STATUS) as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in {_STATUS}")
    return int(match.group(1)) * 1024


def cpu_peak_supported() -> str | None:
    """None when the CPU peak can be measured here, else why not."""
    if _LIBC is None:
        return "no glibc malloc_trim: CPU peak memory not measured"
    try:
        _status_bytes("VmHWM")
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError as e:
        return f"cannot reset the peak RSS ({e}): CPU peak memory not measured"
    return None


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, object]:
    """(peak bytes above the baseline during one call of ``fn``, its result). On the
    CPU the figure is sound only in a process with the ``MAPPED`` thresholds since
    it started: the harness measures there (:mod:`attn_zoo.bench.peak_process`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, result
    if cpu_peak_supported() is not None:
        return None, fn()
    _LIBC.malloc_trim(0)
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    result = fn()
    return max(0, _status_bytes("VmHWM") - base), result
