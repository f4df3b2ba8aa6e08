"""Run one case: time, peak memory, equivalence, work. Never raises for a
failing case: out-of-memory, NaN/Inf and exceptions become the row's status."""

from __future__ import annotations

import json
import math
import traceback
from dataclasses import asdict, replace

import torch

import attn_zoo
from attn_zoo import oracle
from attn_zoo.bench.cases import Case
from attn_zoo.bench.measure import peak_memory, summarize, time_call
from attn_zoo.bench.peak_process import cpu_peak
from attn_zoo.bench.settings import MODE_FLOP_FACTOR, MODES, RunSettings
from attn_zoo.validation import DTYPES, Unsupported

__all__ = ["MODES", "TOLERANCE", "more_samples", "run_case", "skip_reason", "timing_columns"]

#: err_oracle must be under this for the row to be ok (shared/DESIGN.md).
TOLERANCE = {"float64": 1e-5, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text


def case_inputs(case: Case, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    grad = case.mode != "fwd"
    return [
        torch.randn(shape, generator=g, dtype=torch.float32)
        .to(device=case.device, dtype=DTYPES[case.dtype])
        .requires_grad_(grad)
        for _ in range(3)
    ]


def skip_reason(case: Case) -> str | None:
    """Why a case cannot run here (None when it can)."""
    mech = attn_zoo.get(case.mechanism)
    impl = mech.impl(case.impl)
    device = torch.device(case.device)
    why = impl.unavailable(device)
    if why:
        return why
    if impl.dtypes is not None and DTYPES[case.dtype] not in impl.dtypes:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in impl.dtypes)
        return f"dtype {case.dtype} is not supported by {case.impl}; accepted dtypes: {accepted}"
    if impl.head_dims is not None and case.head_dim not in impl.head_dims:
        accepted = ", ".join(map(str, impl.head_dims))
        return (
            f"head_dim {case.head_dim} is not supported by {case.impl}; "
            f"accepted head dims: {accepted}"
        )
    if case.mode != "fwd" and not impl.differentiable(device):
        return f"{case.mechanism}/{case.impl} has no backward pass on {device.type}"
    if impl.interpreted(device) and case.dtype == "bfloat16":
        return "the Triton interpreter has no bfloat16"
    return None


def case_calls(case: Case, mech, q, k, v):
    """(setup, timed): what one timed call runs, and what runs untimed before it."""

    def forward():
        return mech(q, k, v, causal=case.causal, impl=case.impl)

    def call():
        out = forward()
        if case.mode == "fwd_bwd":
            out.backward(torch.ones_like(out))
        return out

    if case.mode != "bwd":
        return None, call
    held = {}

    def setup():  # the forward outside the timed region, each time
        for x in (q, k, v):
            x.grad = None
        held["out"] = forward()

    def timed():
        held["out"].backward(torch.ones_like(held["out"]))
        return held["out"]

    return setup, timed


def _share(settings: RunSettings, warmup: int) -> dict:
    """One round's part of the timing budget (the sweep spreads it over rounds)."""
    rounds = settings.rounds
    return dict(warmup=warmup, repeats=-(-settings.repeats // rounds),
                min_time=settings.min_time / rounds, cuda_graph=settings.cuda_graph)  # fmt: skip


def more_samples(case: Case, settings: RunSettings) -> list[float]:
    """A later round's timing samples of a case that measured ok in round 0."""
    mech = attn_zoo.get(case.mechanism)
    q, k, v = case_inputs(case, settings.seed)
    setup, timed = case_calls(case, mech, q, k, v)
    share = _share(settings, warmup=0)
    timing = time_call(timed, torch.device(case.device), share["warmup"], share["repeats"],
                       share["min_time"], setup=setup, cuda_graph=share["cuda_graph"])  # fmt: skip
    return timing.samples_ms


def run_case(case: Case, settings: RunSettings) -> dict:
    """The measured row for ``case`` (without the key columns): round 0's timing
    samples (``time_samples_ms``), peak memory, equivalence and work."""
    row: dict = {"status": "ok", "note": "", "repeats": settings.repeats}
    try:
        mech = attn_zoo.get(case.mechanism)
        row["config"] = json.dumps(asdict(mech.config), sort_keys=True)
        why = skip_reason(case)
        if why:
            return {**row, "status": "skipped", "note": why}
        device = torch.device(case.device)
        impl = mech.impl(case.impl)
        row["interpreted"] = impl.interpreted(device)
        q, k, v = case_inputs(case, settings.seed)
        plan = mech.plan(q, k, v, case.causal)
        pairs = _pairs(case, settings.seed, mech, (q, k, v), plan)
        row["flops"] = 4 * case.head_dim * pairs * MODE_FLOP_FACTOR[case.mode]
        row["density"] = pairs / plan.full_pairs
        setup, timed = case_calls(case, mech, q, k, v)
        share = _share(settings, warmup=settings.warmup)
        timing = time_call(timed, device, share["warmup"], share["repeats"], share["min_time"],
                           setup=setup, cuda_graph=share["cuda_graph"])  # fmt: skip
        row.update(timing_columns(timing.samples_ms))
        row["first_call_ms"] = timing.first_ms
        row["note"] = _tile_note(case, device)
        if setup is not None:
            setup()
        if device.type == "cuda":
            peak, out = peak_memory(timed, device)
            why = None
        else:  # in the helper process; this call gives the output to check
            out = timed()
            peak, why = cpu_peak(case, settings.seed, settings.reference_budget,
                                 min(settings.warmup, 1))  # fmt: skip
        row["peak_mem_bytes"] = peak
        if peak is None:
            row["note"] = why or "peak memory not measured on this platform"
        out = out.detach()
        if not torch.isfinite(out).all():
            bad = (~torch.isfinite(out)).sum().item()
            return {**row, "status": "nan", "note": f"{bad} non-finite output values"}
        _equivalence(row, mech, case, (q, k, v), plan, out, settings)
    except Unsupported as error:  # the impl cannot express this config: said, not run
        row.update(status="skipped", note=str(error)[:300])
    except Exception as error:  # a failing case is a row, the sweep goes on
        status = "oom" if _is_oom(error) else "failed"
        last = traceback.extract_tb(error.__traceback__)[-1:]
        where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last else ""
        row.update(status=status, note=f"{type(error).__name__}: {error}{where}"[:300])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


#: Attended pairs by mechanism (class and config), case (impl and mode blanked) and seed.
_PAIRS: dict[tuple, int] = {}


def _pairs(case: Case, seed: int, mech, qkv, plan) -> int:
    """The pairs ``case`` attends, counted once for every impl and mode of the same
    mechanism and inputs: counted from the oracle's bias, that took 12-28 s at
    N = 8,192 on 2 CPU cores for adaptive span, xl and compressive, a case."""
    key = (type(mech), repr(mech.config), replace(case, impl="", mode=""), seed)
    if key not in _PAIRS:
        _PAIRS[key] = mech.pairs(*(t.detach() for t in qkv), plan)
    return _PAIRS[key]


def _tile_note(case: Case, device: torch.device) -> str:
    """The autotuner's choice for a triton row on CUDA ("" elsewhere)."""
    if case.impl != "triton" or device.type != "cuda":
        return ""
    from attn_zoo.kernels.tuning import last_tile

    tile = last_tile()
    return f"tile {tile} (autotuned)" if tile is not None else ""


def timing_columns(samples_ms: list[float]) -> dict:
    """The row's timing columns from every sample of every round."""
    timing = summarize(samples_ms)
    return {"time_ms": timing.median_ms, "time_ms_p20": timing.p20_ms,
            "time_ms_p80": timing.p80_ms, "repeats": len(samples_ms),
            "time_samples_ms": timing.samples_text()}  # fmt: skip


def _equivalence(row, mech, case, qkv, plan, out, settings) -> None:
    """err_oracle and err_dense on a recorded sample of query rows."""
    q, k, v = (t.detach() for t in qkv)
    rows = oracle.sample_rows(case.seq_len, settings.oracle_rows, seed=settings.seed)
    row["oracle_rows"] = len(rows)
    picked = out[:, :, rows.to(out.device)]
    full = oracle.dense(*mech.inputs(q, k, v), case.causal, rows)
    row["err_dense"] = oracle.rel_error(picked, full)
    other = mech.impl(case.impl).variant(mech, case.causal)
    if other:  # another variant of the mechanism: its oracle does not apply
        said = f"no err_oracle: {other}"
        row["note"] = (f"{row['note']}; {said}" if row["note"] else said)[:300]
        return
    expected = oracle.evaluate(q, k, v, mech.oracle(q, k, v, plan, rows), rows)
    row["err_oracle"] = oracle.rel_error(picked, expected)
    tol = TOLERANCE[case.dtype]
    if not math.isfinite(row["err_oracle"]) or row["err_oracle"] > tol:
        row.update(
            status="failed",
            note=f"err_oracle {row['err_oracle']:.3g} above the {case.dtype} tolerance {tol:g}",
        )
