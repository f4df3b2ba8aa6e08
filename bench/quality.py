"""``bench quality``: what each mechanism loses, beside what it costs.

Two families of measurements, each a row of ``results/<run-id>/quality.csv``
(mechanism, config, impl, task, seq_len, seed, metric, value, status, note),
written as each unit finishes so that ``--resume`` loses nothing:

* ``minilm`` (:mod:`attn_zoo.bench.real_model`): real attention of a pretrained
  encoder on installed English text, no training; per-layer relative error
  and pattern mass share, and the embedding cosine against dense attention;
* ``recall``, ``passkey``, ``copy`` (:mod:`attn_zoo.bench.tasks`): a small model
  (:mod:`attn_zoo.bench.tiny_model`) trained per mechanism for a fixed number
  of steps at each ``--seq-lens`` N; held-out accuracy, chance level, final
  loss and training time.

Each mechanism is configured for the length it runs at (:func:`configs_for`),
so that its local windows are shorter than the tasks' dependencies.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import time
from pathlib import Path

import torch

import attn_zoo
from attn_zoo.bench.console import make_console
from attn_zoo.bench.errors import UsageError
from attn_zoo.bench.settings import choices, positive_ints
from attn_zoo.bench.store import command_line, environment, read_meta
from attn_zoo.bench.tasks import TASKS
from attn_zoo.bench.tiny_model import TrainSettings, train

COLUMNS = ("mechanism", "config", "impl", "task", "seq_len", "seed", "metric", "value",
           "status", "note")  # fmt: skip
UNIT = ("mechanism", "task", "seq_len", "seed")  # what --resume skips when present
REAL = "minilm"
#: The defaults argparse fills in itself (the others default to None: DEFAULTS or QUICK).
GIVEN_DEFAULTS = {"tasks": "minilm,recall,passkey,copy", "mechanisms": "all", "seeds": "0"}
QUALITY_ARGS = ("tasks", "mechanisms", "seq_lens", "real_len", "real_sequences", "seeds",
                "steps", "batch")  # fmt: skip
DEFAULTS = {"seq_lens": "64,128", "real_len": "512", "real_sequences": "2", "steps": "250",
            "batch": "16"}  # fmt: skip
#: --quick (tests): these instead of the defaults, where the flag is not given
QUICK = {"seq_lens": "64", "real_len": "128", "real_sequences": "1", "steps": "20", "batch": "8"}


def configs_for(mechanism: str, n: int) -> dict:
    """Each mechanism set up for length N: local windows and segments a quarter of N
    or shorter, so that dependencies across the sequence exceed them."""
    stride = max(8, 2 ** round(math.log2(math.sqrt(n))))
    return {
        "dense": {},
        "sparse_strided": {"stride": stride},
        "sparse_fixed": {"stride": stride, "summary": max(1, stride // 4)},
        "adaptive_span": {"span_range": (n / 32, n / 4), "ramp": max(4.0, n / 32)},
        "xl": {"segment_len": n // 4, "mem_len": n // 4},
        "compressive": {"segment_len": n // 4, "mem_len": n // 4, "cmem_len": n // 8, "rate": 2},
        "lsh": {"bucket_size": max(8, n // 16)},
        "routing": {"window": n // 4},
    }.get(mechanism, {})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--tasks",
        default=",".join([REAL, *TASKS]),
        help=f"comma-separated: {REAL} (pretrained, no training), {', '.join(TASKS)}",
    )
    add("--mechanisms", default="all", help="comma-separated registry keys, or all")
    add("--seq-lens", default=None, help=f"lengths of the trained tasks ({DEFAULTS['seq_lens']})")
    add("--real-len", default=None, help=f"tokens per real-text sequence ({DEFAULTS['real_len']})")
    add(
        "--real-sequences",
        default=None,
        help=f"real-text sequences per mechanism ({DEFAULTS['real_sequences']})",
    )
    add("--seeds", default="0", help="comma-separated seeds of the trained tasks (default 0)")
    add("--steps", default=None, help=f"training steps per task ({DEFAULTS['steps']})")
    add("--batch", default=None, help=f"training batch ({DEFAULTS['batch']})")
    add("--quick", action="store_true", help="tiny settings for tests: " +
        ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))  # fmt: skip
    add("--out", default="results", help="folder for run folders (default results)")
    add("--run-id", default=None, help="run folder name (default quality-<time>)")
    add("--resume", default=None, metavar="RUN_FOLDER", help="finish an interrupted run")


def _units(args) -> list[tuple[str, str, int, int]]:
    tasks = choices("--tasks", args.tasks, [REAL, *TASKS])
    mechanisms = attn_zoo.names() if args.mechanisms == "all" else choices(
        "--mechanisms", args.mechanisms, attn_zoo.names())  # fmt: skip
    lens = positive_ints("--seq-lens", args.seq_lens)
    for n in lens:
        if not 32 <= n <= 4096:
            raise UsageError(f"--seq-lens: {n}; accepted: 32 to 4096 for the trained tasks")
    real_len = positive_ints("--real-len", args.real_len)[0]
    if not 32 <= real_len <= 512:
        raise UsageError(f"--real-len: {real_len}; accepted: 32 to 512 (the model's positions)")
    seeds = [int(s) for s in str(args.seeds).split(",")]
    for flag, value in (("--steps", args.steps), ("--batch", args.batch),
                        ("--real-sequences", args.real_sequences)):  # fmt: skip
        positive_ints(flag, value)
    units = []
    for mech in mechanisms:
        for task in tasks:
            if task == REAL:
                units.append((mech, task, real_len, 0))
            else:
                units += [(mech, task, n, seed) for n in lens for seed in seeds]
    return units


class QualityStore:
    """quality.csv + meta.json, appended and flushed as each unit finishes."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.csv_path = folder, folder / "quality.csv"
        self.meta_path = folder / "meta.json"

    def rows(self) -> list[dict]:
        try:
            text = self.csv_path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{self.csv_path}: not UTF-8 text (damaged quality.csv)") from None
        lines = list(csv.reader(text.splitlines()))
        if not lines or lines[0] != list(COLUMNS):
            raise UsageError(f"{self.csv_path}: not a quality table (header {lines[:1]})")
        for number, row in enumerate(lines[1:], start=2):
            if len(row) != len(COLUMNS):
                raise UsageError(f"{self.csv_path}: line {number} is not a complete row")
        return [dict(zip(COLUMNS, row, strict=True)) for row in lines[1:]]

    def done(self) -> set[tuple[str, ...]]:
        return {tuple(r[c] for c in UNIT) for r in self.rows()}

    def append(self, rows: list[dict]) -> None:
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            for row in rows:
                writer.writerow({c: _text(row.get(c)) for c in COLUMNS})
            f.flush()
            os.fsync(f.fileno())


def _text(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _open(args) -> tuple[QualityStore, argparse.Namespace]:
    if args.resume:
        store = QualityStore(Path(args.resume))
        if not store.meta_path.is_file() or not store.csv_path.is_file():
            raise UsageError(f"--resume: {args.resume} is not a quality run folder")
        stored = read_meta(store.meta_path).get("args", {})
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {stored.get(k)})"
                   for k in QUALITY_ARGS
                   if getattr(args, k) not in (None, GIVEN_DEFAULTS.get(k))
                   and str(getattr(args, k)) != str(stored.get(k))]  # fmt: skip
        if changed:
            raise UsageError(f"--resume: {args.resume} keeps its own settings; refusing "
                             f"{'; '.join(changed)}")  # fmt: skip
        for name, value in stored.items():
            setattr(args, name, value)
        store.rows()  # validated before anything is appended
        return store, args
    run_id = args.run_id or f"quality-{dt.datetime.now():%Y%m%d-%H%M%S}"
    folder = Path(args.out).expanduser() / run_id
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise UsageError(f"--out: {folder} exists; pick another --run-id or --resume it") from None
    except OSError as e:
        raise UsageError(f"--out: cannot write to {folder.parent}: {e.strerror}") from None
    store = QualityStore(folder)
    meta = {"run_id": run_id, "kind": "quality", "command": command_line(),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "args": {k: getattr(args, k) for k in QUALITY_ARGS},
            **environment(torch.device("cpu"))}  # fmt: skip
    store.meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    with open(store.csv_path, "w", newline="") as f:
        csv.writer(f).writerow(COLUMNS)
    return store, args


#: Training time of the average mechanism over dense's (measured: about 1.5 on 2 cores).
MECHANISM_FACTOR = 1.5


def _estimate(units, args) -> float:
    """Seconds the run should take: dense's training steps timed at each length
    (4 steps after one), times the average mechanism's factor; about a second per
    real-text sequence and mechanism."""
    per_step = {}
    for _, task, n, _ in units:
        if task != REAL and n not in per_step:
            warm = TrainSettings(steps=1, batch=int(args.batch))
            train("copy", n, "dense", {}, 0, warm, held_out=0)
            start = time.perf_counter()
            train("copy", n, "dense", {}, 0, TrainSettings(steps=4, batch=int(args.batch)),
                  held_out=0)  # fmt: skip
            per_step[n] = (time.perf_counter() - start) / 4
    steps = int(args.steps)
    trained = sum(per_step[n] * steps * MECHANISM_FACTOR for _, t, n, _ in units if t != REAL)
    real = sum(1.0 * int(args.real_sequences) for _, t, _, _ in units if t == REAL)
    return trained + real


def run_unit(unit, args, encoder_cache: dict) -> list[dict]:
    mechanism, task, n, seed = unit
    config = configs_for(mechanism, n)
    base = {"mechanism": mechanism, "config": json.dumps(config, sort_keys=True),
            "impl": "reference", "task": task, "seq_len": n, "seed": seed}  # fmt: skip
    try:
        if task == REAL:
            from attn_zoo.bench import real_model

            if "encoder" not in encoder_cache:
                encoder_cache["encoder"] = real_model.load_encoder()
                encoder = encoder_cache["encoder"]
                encoder_cache["ids"] = real_model.sequences(encoder, int(args.real_sequences), n)
            encoder, ids = encoder_cache["encoder"], encoder_cache["ids"]
            metrics = real_model.probe_layers(encoder, ids, mechanism, config)
            metrics["embedding_cosine"] = real_model.embedding_cosine(encoder, ids, mechanism,
                                                                      config)  # fmt: skip
        else:
            settings = TrainSettings(steps=int(args.steps), batch=int(args.batch))
            metrics = train(task, n, mechanism, config, seed, settings)
    except UsageError:
        raise
    except Exception as error:  # a failing unit is a row, the run goes on
        return [{**base, "metric": "error", "value": None, "status": "failed",
                 "note": f"{type(error).__name__}: {error}"[:300]}]  # fmt: skip
    return [{**base, "metric": k, "value": float(v), "status": "ok", "note": ""}
            for k, v in metrics.items()]  # fmt: skip


def run_quality(args: argparse.Namespace) -> int:
    if args.resume and args.quick:
        raise UsageError("--resume: a run keeps its own settings; --quick cannot change them")
    if not args.resume:
        for name, value in (QUICK if args.quick else DEFAULTS).items():
            if getattr(args, name) is None:  # a flag given wins over --quick
                setattr(args, name, value)
        _units(args)  # bad arguments: no run folder
        if REAL in args.tasks:
            from attn_zoo.bench.real_model import load_encoder

            load_encoder()  # a missing model package is an error before anything runs
    store, args = _open(args)  # on --resume: the flags given against the run's
    units = _units(args)
    done = store.done()
    todo = [u for u in units if tuple(str(x) for x in u) not in done]
    console = make_console()
    estimate = _estimate(todo, args) if todo else 0.0
    already = len(units) - len(todo)
    console.print(
        f"bench quality: {len(todo)} unit(s) to run ({already} already in {store.csv_path}); "
        f"estimated {estimate / 60:.1f} min on this machine"
    )
    cache: dict = {}
    failed = 0
    for index, unit in enumerate(todo, start=1):
        start = time.perf_counter()
        rows = run_unit(unit, args, cache)
        store.append(rows)
        failed += any(r["status"] != "ok" for r in rows)
        headline = {r["metric"]: r["value"] for r in rows}
        shown = headline.get("accuracy", headline.get("embedding_cosine"))
        value = f"{shown:.3f}" if isinstance(shown, float) else rows[0]["note"]
        mech, task, n, seed = unit
        console.print(f"[{index}/{len(todo)}] {mech} {task} N={n} seed={seed}: {value} "
                      f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    console.print(f"bench quality: wrote {store.csv_path} ({failed} unit(s) failed)")
    return 0
