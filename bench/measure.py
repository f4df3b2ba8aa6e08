"""How the harness measures time and peak memory.

Time: ``warmup`` calls, then ``repeats`` timed calls; the median with the 20th
and 80th percentiles. On CUDA each call is bracketed by device events; on the
CPU by ``time.perf_counter``.

Peak memory, from a clean baseline taken just before one extra call:

* CUDA: the caching allocator's peak (``max_memory_allocated``) minus what was
  allocated before the call.
* CPU: the process's peak resident set size. Linux keeps it as ``VmHWM`` in
  ``/proc/self/status`` and resets it when ``5`` is written to
  ``/proc/self/clear_refs``. Before the call the harness returns freed heap
  pages to the OS (``malloc_trim``) and resets the peak; the figure is
  ``VmHWM`` after the call minus ``VmRSS`` before it. glibc's mmap threshold is
  fixed at 64 KiB so that tensors are mapped and unmapped on alloc/free instead
  of lingering in the heap. Where this is not possible (not Linux/glibc) the
  figure is left empty and the note says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


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
    return Timing(statistics.median(xs), _percentile(xs, 0.2), _percentile(xs, 0.8))


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronization (a no-op on the CPU)."""
    if device.type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Median and spread of ``fn``'s wall time, synchronized on CUDA."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """The device's measured bf16 matrix-multiply rate: the roof that effective
    TFLOP/s are drawn against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    timing = time_call(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12


# -- peak memory -----------------------------------------------------------------
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_M_MMAP_THRESHOLD = -3


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
if _LIBC is not None:
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)


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
    """(peak bytes above the baseline during one call of ``fn``, its result)."""
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
