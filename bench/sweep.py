"""``bench run``: expand the sweep, run every case, write each row as it finishes."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch

import attn_zoo
from attn_zoo.bench.cases import Case, expand
from attn_zoo.bench.cli import choices, positive_ints
from attn_zoo.bench.console import Reporter, summary_table
from attn_zoo.bench.devices import device_dtypes, resolve_device
from attn_zoo.bench.errors import UsageError
from attn_zoo.bench.runner import MODES, Settings, run_case
from attn_zoo.bench.store import RunStore, command_line, environment, new_run_id

#: The settings a run folder keeps in meta.json, so that --resume repeats them.
SWEEP_ARGS = (
    "seq_lens", "mechanisms", "impls", "device", "dtype", "batch", "heads", "head_dim",
    "causal", "mode", "repeats", "warmup", "seed", "oracle_rows", "interpret",
)  # fmt: skip


def _all_impls() -> list[str]:
    seen: dict[str, None] = {}
    for name in attn_zoo.names():
        seen.update(dict.fromkeys(attn_zoo.get(name).impls))
    return list(seen)


def plan_cases(args: argparse.Namespace) -> tuple[torch.device, list[Case]]:
    """Validate the sweep arguments and expand them into cases."""
    device = resolve_device(args.device)
    seq_lens = positive_ints("--seq-lens", args.seq_lens)
    mechanisms = (
        attn_zoo.names()
        if args.mechanisms == "all"
        else choices("--mechanisms", args.mechanisms, attn_zoo.names())
    )
    dtypes = choices("--dtype", args.dtype, device_dtypes(device))
    modes = choices("--mode", args.mode, list(MODES))
    if args.repeats < 1 or args.warmup < 0 or args.oracle_rows < 2:
        raise UsageError("--repeats must be >= 1, --warmup >= 0 and --oracle-rows >= 2")
    wanted = None if args.impls is None else choices("--impls", args.impls, _all_impls())
    per_mechanism = []
    for name in mechanisms:
        impls = attn_zoo.get(name).impls
        if wanted is None:
            picked = [i for i, impl in impls.items() if impl.default_on(device)]
        else:
            picked = [i for i in wanted if i in impls]
        if picked:
            per_mechanism.append((name, picked))
    cases = expand(
        per_mechanism,
        device=device.type,
        dtypes=dtypes,
        batches=positive_ints("--batch", args.batch),
        heads=positive_ints("--heads", args.heads),
        head_dims=positive_ints("--head-dim", args.head_dim),
        seq_lens=seq_lens,
        causal=args.causal,
        modes=modes,
    )
    if not cases:
        raise UsageError(
            f"no case to run: none of --mechanisms {args.mechanisms} has --impls {args.impls}"
        )
    return device, cases


def _open_store(args: argparse.Namespace) -> RunStore:
    if args.resume:
        store = RunStore.open_existing(Path(args.resume))
        meta = store.read_meta()
        for name, value in meta["args"].items():
            setattr(args, name, value)
        meta.setdefault("resumed", []).append(
            {"at": dt.datetime.now().isoformat(timespec="seconds"), "command": command_line()}
        )
        store.write_meta(meta)
        return store
    device = resolve_device(args.device)
    run_id = args.run_id or new_run_id(device.type)
    meta = {
        "run_id": run_id,
        "command": command_line(),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "args": {name: getattr(args, name) for name in SWEEP_ARGS},
        **environment(device),
    }
    return RunStore.create(Path(args.out).expanduser(), run_id, meta)


def run_sweep(args: argparse.Namespace) -> int:
    if args.resume is None:
        plan_cases(args)  # reject bad arguments before creating the run folder
    store = _open_store(args)
    device, cases = plan_cases(args)
    done = store.done_keys()
    todo = [c for c in cases if c.key() not in done]
    settings = Settings(args.warmup, args.repeats, args.seed, args.oracle_rows)
    print(
        f"bench: {len(todo)} case(s) to run on {device.type} "
        f"({len(cases) - len(todo)} already in {store.csv_path})",
        flush=True,
    )
    with Reporter(len(todo)) as reporter:
        for case in todo:
            reporter.starting(case)
            row = run_case(case, settings)
            store.append(case, row)
            reporter.finished(case, row)
    rows = store.rows()
    reporter.console.print(summary_table(rows, title=f"{store.folder}"))
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    print(f"bench: wrote {store.csv_path} ({len(rows)} rows, {len(bad)} not ok)", flush=True)
    return 0
