"""CPU peak memory, measured in a helper process that does nothing else.

The sweep's own process times cases with glibc's ordinary thresholds, so a freed
tensor's pages stay in its heap for the next call, as in any program (see
:mod:`attn_zoo.bench.measure`). A peak read there would count whatever that heap
happens to hold. The helper is spawned once and reused; it maps every tensor
above 64 KiB and never times anything, so its heap stays clean and the growth of
its peak RSS during a call is that call's own. It rebuilds the case from its
description (the same inputs, from the same seed) and reports the peak or why
there is none; a helper that dies (out of memory) is replaced on the next case.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection

from attn_zoo.bench.cases import Case

_helper: list = []  # [process, connection] while one is running


def _serve(conn: Connection) -> None:
    import torch

    from attn_zoo.bench import measure

    measure.use_thresholds(measure.MAPPED)
    import attn_zoo
    from attn_zoo.bench.runner import case_calls, case_inputs
    from attn_zoo.tiles import score_budget

    while True:
        try:
            case, seed, budget, warmup = conn.recv()
        except EOFError:
            return
        try:
            mech = attn_zoo.get(case.mechanism)
            setup, timed = case_calls(case, mech, *case_inputs(case, seed))
            with score_budget(budget):
                for _ in range(warmup + 1):  # warm-up calls, then the measured one
                    if setup is not None:
                        setup()
                    peak, _ = measure.peak_memory(timed, torch.device("cpu"))
            conn.send((peak, None if peak is not None else measure.cpu_peak_supported()))
        except Exception as error:
            conn.send((None, f"peak memory not measured: {type(error).__name__}: {error}"))


def _connection() -> Connection:
    if _helper and _helper[0].is_alive():
        return _helper[1]
    stop()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(child,), daemon=True, name="attn-zoo peak")
    process.start()
    child.close()
    _helper[:] = [process, parent]
    return parent


def cpu_peak(case: Case, seed: int, budget: int, warmup: int = 1) -> tuple[int | None, str | None]:
    """(peak bytes of one call of ``case`` above the baseline, None) measured in the
    helper after ``warmup`` calls, or (None, why not)."""
    try:
        conn = _connection()
        conn.send((case, seed, budget, warmup))
        return conn.recv()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        stop()
        return None, "peak memory not measured: the helper process died (out of memory?)"


def stop() -> None:
    """End the helper (a later measurement starts a new one)."""
    if _helper:
        process, conn = _helper
        conn.close()
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    _helper.clear()
