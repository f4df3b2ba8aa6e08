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

import os
import pickle
import signal
import subprocess
import sys

from attn_zoo.bench.cases import Case

_helper: list[subprocess.Popen] = []  # the running helper, if any


def _serve() -> None:
    """The helper's loop: (case, seed, budget, warmup) in on stdin, (peak, why) out."""
    replies = os.fdopen(os.dup(1), "wb")  # a private channel: stray prints go to stderr
    os.dup2(2, 1)
    # A Ctrl-C (or timeout -s INT) reaches the whole process group: the sweep handles it
    # and keeps its rows; the helper ends when the sweep closes its stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from attn_zoo.bench import measure

    measure.use_thresholds(measure.MAPPED)
    import attn_zoo
    from attn_zoo.bench.runner import case_calls, case_inputs
    from attn_zoo.tiles import score_budget

    requests = sys.stdin.buffer
    while True:
        try:
            case, seed, budget, warmup = pickle.load(requests)
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
            reply = (peak, None if peak is not None else measure.cpu_peak_supported())
        except Exception as error:
            reply = (None, f"peak memory not measured: {type(error).__name__}: {error}")
        try:
            pickle.dump(reply, replies)
            replies.flush()
        except BrokenPipeError:  # the sweep stopped while this case was measured
            return


def _process() -> subprocess.Popen:
    if _helper and _helper[0].poll() is None:
        return _helper[0]
    stop()
    process = subprocess.Popen([sys.executable, "-m", "attn_zoo.bench.peak_process"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    _helper.append(process)
    return process


def cpu_peak(case: Case, seed: int, budget: int, warmup: int = 1) -> tuple[int | None, str | None]:
    """(peak bytes of one call of ``case`` above the baseline, None) measured in the
    helper after ``warmup`` calls, or (None, why not)."""
    try:
        process = _process()
        pickle.dump((case, seed, budget, warmup), process.stdin)
        process.stdin.flush()
        return pickle.load(process.stdout)
    except (EOFError, BrokenPipeError, ConnectionResetError, pickle.UnpicklingError):
        stop()
        return None, "peak memory not measured: the helper process died (out of memory?)"


def stop() -> None:
    """End the helper (a later measurement starts a new one)."""
    for process in _helper:
        for stream in (process.stdin, process.stdout):
            stream.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
    _helper.clear()


if __name__ == "__main__":
    _serve()
