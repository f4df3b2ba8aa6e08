"""``bench run``: expand the sweep, run every case, write each row as it finishes."""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import attn_zoo
from attn_zoo.bench.cases import Case, expand
from attn_zoo.bench.console import Reporter, summary_table
from attn_zoo.bench.errors import UsageError
from attn_zoo.bench.runner import more_samples, run_case, timing_columns
from attn_zoo.bench.settings import SWEEP_ARGS, RunSettings
from attn_zoo.bench.store import RunStore, command_line, environment, new_run_id
from attn_zoo.tiles import score_budget

#: Flags that say where a run goes, not what it measures: --resume ignores none of
#: the others silently.
PLACEMENT = ("out", "run_id", "resume", "command")


def plan_cases(settings: RunSettings) -> list[Case]:
    """The sweep's cases, each mechanism with the implementations asked for."""
    per_mechanism = []
    for name in settings.mechanisms:
        impls = attn_zoo.get(name).impls
        if settings.impls is None:
            picked = [i for i, impl in impls.items() if impl.default_on(settings.device)]
        else:
            picked = [i for i in settings.impls if i in impls]
        if picked:
            per_mechanism.append((name, picked))
    cases = expand(
        per_mechanism,
        device=settings.device.type,
        dtypes=list(settings.dtypes),
        batches=list(settings.batches),
        heads=list(settings.heads),
        head_dims=list(settings.head_dims),
        seq_lens=list(settings.seq_lens),
        causal=settings.causal,
        modes=list(settings.modes),
    )
    if not cases:
        raise UsageError(
            f"no case to run: none of --mechanisms {','.join(settings.mechanisms)} has "
            f"--impls {','.join(settings.impls or ())}"
        )
    return cases


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resumed(args: argparse.Namespace, given: dict) -> tuple[RunStore, argparse.Namespace]:
    """Reopen a run folder with its own settings; a flag given with another value
    than the run's is refused, naming it."""
    store = RunStore.open_existing(Path(args.resume))
    meta = store.read_meta()
    stored = meta["args"]
    changed = [
        f"{_flag(name)} {given[name]} (the run has {stored.get(name)})"
        for name in given
        if name not in PLACEMENT and str(given[name]) != str(stored.get(name))
    ]
    if changed:
        raise UsageError(
            f"--resume: {store.folder} keeps its own settings; refusing {'; '.join(changed)}. "
            f"Start a new run for other settings"
        )
    for name in SWEEP_ARGS:
        if name in stored:
            setattr(args, name, stored[name])
    meta.setdefault("resumed", []).append(
        {"at": dt.datetime.now().isoformat(timespec="seconds"), "command": command_line()}
    )
    store.write_meta(meta)
    return store, args


def _measure(todo: list[Case], settings: RunSettings, store: RunStore, reporter) -> None:
    """Every case in ``settings.rounds`` passes over the sweep, each taking its share of
    the timing budget, so that a case's samples span the run's changing machine load
    (a shared machine drifts by 10-30% over minutes). Round 0 also measures memory
    and equivalence; a case's row is written when its last round ends, and every
    round is recorded on the way (``pending.jsonl``), so an interrupted sweep
    resumes where it stopped."""
    state = store.pending()
    start = time.perf_counter()
    for number in range(settings.rounds):
        if number:
            reporter.note(f"bench: timing round {number} of {settings.rounds} done "
                          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
        for case in todo:
            entry = state.setdefault(case.key(), {"row": None, "rounds": {}})
            if number not in entry["rounds"]:  # else: measured before an interruption
                if number == 0:
                    reporter.starting(case)
                    entry["row"] = run_case(case, settings)
                    samples = [
                        float(x) for x in str(entry["row"].get("time_samples_ms") or "").split()
                    ]
                elif entry["row"].get("status") != "ok":
                    continue
                else:
                    samples = _later_round(case, settings, entry, number)
                store.append_round(case, number, samples, entry["row"] if number == 0 else None)
                entry["rounds"][number] = samples
            row = entry["row"]
            if number == settings.rounds - 1 or (number == 0 and row.get("status") != "ok"):
                if row.get("status") == "ok" and row.get("time_samples_ms"):
                    every = [x for k in sorted(entry["rounds"]) for x in entry["rounds"][k]]
                    row = {**row, **timing_columns(every)}
                store.append(case, row)
                reporter.finished(case, row)


def _later_round(case: Case, settings: RunSettings, entry: dict, number: int) -> list[float]:
    try:
        return more_samples(case, settings)
    except Exception as error:  # keep round 0's row; say why its timing stopped short
        note = f"timing round {number} failed: {type(error).__name__}: {error}"
        entry["row"]["note"] = (entry["row"].get("note", "") + " " + note).strip()[:300]
        return []


def run_sweep(args: argparse.Namespace, given: dict | None = None) -> int:
    given = given or {}
    if args.resume:
        store, args = _resumed(args, given)
        settings = RunSettings.from_args(args)
    else:
        settings = RunSettings.from_args(args)  # bad arguments: no run folder
        plan_cases(settings)
        environment_now = environment(settings.device)  # the tree before the run
        run_id = args.run_id or new_run_id(settings.device.type)
        meta = {
            "run_id": run_id,
            "command": command_line(),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "args": {name: getattr(args, name) for name in SWEEP_ARGS},
            **environment_now,
        }
        store = RunStore.create(Path(args.out).expanduser(), run_id, meta)
    cases = plan_cases(settings)
    done = store.done_keys()
    todo = [c for c in cases if c.key() not in done]
    print(
        f"bench: {len(todo)} case(s) to run on {settings.device.type} in {settings.rounds} "
        f"round(s) ({len(cases) - len(todo)} already in {store.csv_path})",
        flush=True,
    )
    with Reporter(len(todo)) as reporter, score_budget(settings.reference_budget):
        _measure(todo, settings, store, reporter)
    store.pending_path.unlink(missing_ok=True)  # every case has its row: rounds are done
    rows = store.rows()
    reporter.console.print(summary_table(rows, title=f"{store.folder}"))
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    print(f"bench: wrote {store.csv_path} ({len(rows)} rows, {len(bad)} not ok, "
          f"{len(skipped)} skipped)", flush=True)  # fmt: skip
    if rows and len(skipped) == len(rows):
        reasons = sorted({r["note"] for r in skipped})
        print(f"bench: every case was skipped, nothing was measured: {'; '.join(reasons)}",
              flush=True)  # fmt: skip
        return 1
    return 0
