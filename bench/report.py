"""``bench report RUN [RUN ...]``: PNG plots and a report.md from run folders."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from attn_zoo.bench import kernel_mix, plots, quality_report
from attn_zoo.bench.errors import UsageError
from attn_zoo.bench.runner import TOLERANCE
from attn_zoo.bench.runs import Run, load_run
from attn_zoo.bench.targets import PEERS_TEXT, kernel_targets, peer_targets

TARGETS_TEXT = (
    "vs_sdpa: dense triton speed / sdpa speed (target >= 0.9 for N >= 2048); "
    "tflops_vs_dense: effective TFLOP/s / dense triton's (target >= 0.8); "
    "vs_flex: triton speed / flex speed (target >= 1); "
    "mem_vs_qkvo: (peak + inputs) / bytes of q, k, v, o (target <= 1.25 + O(N))."
)

META_KEYS = (
    "run_id",
    "device_name",
    "cpu_model",
    "python",
    "torch",
    "triton",
    "git_commit",
    "git_dirty",
    "started",
    "command",
    "matmul_tflops",
)


def _markdown(frame: pd.DataFrame, floatfmt: str = ".3g") -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    fmt = lambda x: (
        format(x, floatfmt)
        if isinstance(x, float) and not math.isnan(x)
        else ("" if isinstance(x, float) else str(x))
    )
    body = ["| " + " | ".join(fmt(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def memory_exponents(run: Run) -> pd.DataFrame:
    """log(mem(N2) / mem(N1)) / log(N2 / N1) between successive lengths."""
    out = []
    ok = run.table[run.table.status == "ok"]
    for (mech, impl), rows in ok.groupby(["mechanism", "impl"], sort=False):
        rows = rows.sort_values("seq_len")
        for (_, a), (_, b) in zip(rows.iterrows(), rows.iloc[1:].iterrows(), strict=False):
            if a.peak_mem_bytes > 0 and b.peak_mem_bytes > 0:
                e = math.log(b.peak_mem_bytes / a.peak_mem_bytes) / math.log(b.seq_len / a.seq_len)
                out.append(
                    {
                        "mechanism": mech,
                        "impl": impl,
                        "N": f"{a.seq_len}->{b.seq_len}",
                        "exponent": round(e, 2),
                    }
                )
    return pd.DataFrame(out, columns=["mechanism", "impl", "N", "exponent"])


def _tolerance(runs: list[Run]) -> float | None:
    """The err_oracle tolerance line: one dtype's, when the runs share it."""
    dtypes = {d for r in runs for d in r.table.dtype}
    tolerances = {TOLERANCE.get(d) for d in dtypes}
    return tolerances.pop() if len(tolerances) == 1 else None


def write_report(
    runs: list[Run], out: Path, baseline: str | None = None, quality: list | None = None
) -> list[Path]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot write the report to {out}: {e.strerror}") from None
    files = []
    interpreted = sum(int(r.table.interpreted.sum()) for r in runs)
    measured = [r.measured() for r in runs]
    n_measured = sum(int((r.table.status == "ok").sum()) for r in measured)
    n_checked = sum(int((r.table.status == "ok").sum()) for r in runs)

    def save(fig, name):
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    time_r = mem_r = pd.DataFrame(columns=["run", "mechanism", "impl", "seq_len", "ratio"])
    if n_measured:
        time_fig = plots.panels(measured, lambda t: t.time_ms, "time (ms, median)",
                                "Time vs sequence length")  # fmt: skip
        save(time_fig, "time.png")
        mib = lambda t: t.peak_mem_bytes / 2**20
        memory_fig = plots.panels(measured, mib, "peak memory (MiB)",
                                  "Peak memory vs sequence length")  # fmt: skip
        save(memory_fig, "memory.png")
        fig, time_r, mem_r = plots.speedup_figure(measured, baseline)
        save(fig, "speedup.png")
    if n_checked:
        save(plots.errors_figure(runs, _tolerance(runs)), "errors.png")
    quality_lines = []
    for q in quality or []:
        summary = quality_report.real_model_summary(q, measured)
        if len(summary):
            save(
                quality_report.pareto_figure(
                    summary, "Quality against cost at the same N: all-MiniLM-L6-v2 embedding cosine"
                ),
                "quality.png",
            )
            save(quality_report.layers_figure(q), "layers.png")
            quality_lines += [f"## Quality: {q.label}", "",
                              "Real attention, no training (all-MiniLM-L6-v2 on installed text; "
                              "time and memory: the sweep's reference rows at the same N):", "",
                              _markdown(summary), ""]  # fmt: skip
        tasks = quality_report.task_summary(q)
        if len(tasks):
            quality_lines += ["Long-range tasks, trained (held-out accuracy, mean over seeds):",
                              "", _markdown(tasks), ""]  # fmt: skip
    gpu_runs = [r for r in measured if r.meta.get("device") == "cuda"]
    if gpu_runs:
        peak = max(r.meta.get("matmul_tflops") or 0 for r in gpu_runs) or None
        fig = plots.panels(
            gpu_runs,
            lambda t: t.flops / (t.time_ms * 1e-3) / 1e12,
            "effective TFLOP/s",
            "Effective TFLOP/s (useful FLOPs / time)",
            logy=False,
            hline=peak,
        )
        save(fig, "tflops.png")

    lines = ["# attn-zoo report", ""]
    for run in runs:
        lines += [f"## Run {run.label}", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | `{run.meta.get(k)}` |" for k in META_KEYS if k in run.meta]
        lines += [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in files] + [""]
    lines += quality_lines
    if not n_measured:
        lines += [
            "**No measured row to plot**: no case is both ok and timed outside an "
            "interpreter, so there are no time, memory or speedup plots."
            + (" The errors plot still shows what was checked." if n_checked else ""),
            "",
        ]
    if interpreted:
        lines += [
            f"{interpreted} row(s) ran in Triton's CPU interpreter: they show correctness only "
            "and are left out of the time, memory and speedup plots and crossovers.",
            "",
        ]
    baselines = ", ".join(sorted(set(time_r.get("baseline", [])))) or "none in the runs"
    lines += [
        "## Crossover lengths",
        "",
        f"Against the baseline **{baselines}** (by default the fastest dense implementation "
        "in each run, sdpa where present; `bench report --baseline MECHANISM/IMPL` picks "
        "another). A crossover is the first N from which the mechanism stays faster (time) "
        "or smaller (memory), confirmed by at least two points on that side.",
        "",
    ]
    cross = []
    for what, frame in (("time", time_r), ("memory", mem_r)):
        for (run_id, mech, impl), rows in frame.groupby(["run", "mechanism", "impl"]):
            rows = rows.sort_values("seq_len")
            cross.append({"run": run_id, "mechanism": mech, "impl": impl, "what": what,
                          "vs": rows.baseline.iloc[0],
                          "crossover": plots.describe_crossover(
                              plots.crossover(rows.seq_len, rows.ratio))})  # fmt: skip
    lines += [_markdown(pd.DataFrame(cross)) if cross else "(nothing to compare)", ""]
    for run in runs:
        t = run.table
        cols = [
            "mechanism",
            "impl",
            "dtype",
            "seq_len",
            "causal",
            "mode",
            "status",
            "time_ms",
            "peak_mem_bytes",
            "err_oracle",
            "err_dense",
            "density",
            "interpreted",
            "note",
        ]
        shown = t[cols].copy()
        shown["peak_mem_bytes"] = (shown.peak_mem_bytes / 2**20).round(2)
        shown = shown.rename(columns={"peak_mem_bytes": "peak MiB"})
        lines += [f"## Results: {run.label}", "", _markdown(shown), ""]
        lines += ["### Peak-memory growth exponents", "", _markdown(memory_exponents(run)), ""]
        targets = kernel_targets(t)
        if len(targets):
            lines += ["### Kernel figures (ratios within this run)", "", TARGETS_TEXT, ""]
            lines += [_markdown(targets.drop(columns=["device"]), floatfmt=".3g"), ""]
        against_peers = peer_targets(t)
        if len(against_peers):
            shown = against_peers[["mechanism", "seq_len", *against_peers.columns[-9:]]]
            lines += ["### References against the peers", "", PEERS_TEXT, ""]
            lines += [_markdown(shown, floatfmt=".3g"), ""]
        not_ok = t[t.status != "ok"]
        if len(not_ok):
            lines += [f"**{len(not_ok)} case(s) not ok** (shown as red crosses in the plots):", ""]
            lines += [
                f"- {r.mechanism}/{r.impl} N={r.seq_len}: {r.status} ({r.note})"
                for r in not_ok.itertuples()
            ] + [""]
    lines += kernel_mix.report_section(out)
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return [*files, report]


def run_report(args: argparse.Namespace) -> int:
    quality = [quality_report.load_quality(p) for p in args.runs
               if quality_report.is_quality_run(p)]  # fmt: skip
    runs = [load_run(p) for p in args.runs if not quality_report.is_quality_run(p)]
    if args.baseline is not None and "/" not in args.baseline:
        raise UsageError(
            f"--baseline: {args.baseline!r}; accepted: MECHANISM/IMPL, e.g. dense/sdpa"
        )
    named = "+".join(Path(p).resolve().name for p in args.runs)
    out = Path(args.out) if args.out else Path("reports") / named
    for path in write_report(runs, out, args.baseline, quality):
        print(f"bench report: wrote {path}")
    return 0
