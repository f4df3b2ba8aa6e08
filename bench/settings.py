"""A sweep's settings: the ``bench run`` flags, validated into one typed object.

:mod:`attn_zoo.bench.cli` parses the command line and hands the sweep a
:class:`RunSettings`; a run folder keeps the raw flags in meta.json so that
``--resume`` rebuilds the same settings. Every bad value is a
:class:`UsageError` naming the flag and the accepted values.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import attn_zoo
from attn_zoo.bench.devices import device_dtypes, resolve_device
from attn_zoo.bench.errors import UsageError
from attn_zoo.tiles import DEFAULT_BUDGET

DEFAULT_SEQ_LENS = "512,2048,8192"
#: fwd: forward only; fwd_bwd: forward and backward; bwd: the backward alone, after a
#: forward outside the timed region. FLOPs: backward = 2.5 x forward (5 matmuls vs 2).
MODE_FLOP_FACTOR = {"fwd": 1.0, "fwd_bwd": 3.5, "bwd": 2.5}
MODES = tuple(MODE_FLOP_FACTOR)
#: The flags a run folder keeps in meta.json ("args"), so that --resume repeats them.
SWEEP_ARGS = (
    "seq_lens", "mechanisms", "impls", "device", "dtype", "batch", "heads", "head_dim",
    "causal", "mode", "repeats", "min_time", "rounds", "warmup", "seed", "oracle_rows",
    "interpret", "cuda_graph", "reference_budget",
)  # fmt: skip


def positive_ints(flag: str, text: str) -> list[int]:
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise UsageError(
                f"{flag}: {item!r} is not an integer; expected positive integers "
                f"separated by commas, e.g. {DEFAULT_SEQ_LENS}"
            ) from None
        if value <= 0:
            raise UsageError(f"{flag}: {value} is not positive; accepted: integers >= 1")
        values.append(value)
    return values


def choices(flag: str, text: str, accepted: list[str]) -> list[str]:
    values = [item.strip() for item in str(text).split(",") if item.strip()]
    if not values:
        raise UsageError(f"{flag}: empty; accepted: {', '.join(accepted)}")
    for value in values:
        if value not in accepted:
            raise UsageError(f"{flag}: unknown {value!r}; accepted: {', '.join(accepted)}")
    return values


def all_impls() -> list[str]:
    seen: dict[str, None] = {}
    for name in attn_zoo.names():
        seen.update(dict.fromkeys(attn_zoo.get(name).impls))
    return list(seen)


@dataclass(frozen=True)
class RunSettings:
    """What one sweep runs and how it measures."""

    device: torch.device
    seq_lens: tuple[int, ...]
    mechanisms: tuple[str, ...]
    impls: tuple[str, ...] | None  # None: each mechanism's default implementations here
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    causal: bool
    modes: tuple[str, ...]
    repeats: int  # at least this many timed calls
    min_time: float  # and at least this many seconds of them
    rounds: int  # spread over this many passes of the sweep
    warmup: int
    seed: int
    oracle_rows: int
    interpret: bool
    cuda_graph: bool
    reference_budget: int = DEFAULT_BUDGET  # bytes of scores per chunk of reference tiles

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunSettings:
        device = resolve_device(args.device)
        if args.repeats < 1:
            raise UsageError(f"--repeats: {args.repeats}; accepted: an integer >= 1")
        if args.warmup < 0:
            raise UsageError(f"--warmup: {args.warmup}; accepted: an integer >= 0")
        if args.oracle_rows < 2:
            raise UsageError(
                f"--oracle-rows: {args.oracle_rows}; accepted: an integer >= 2 "
                f"(the first and last rows are always checked)"
            )
        if not args.min_time >= 0:
            raise UsageError(f"--min-time: {args.min_time}; accepted: seconds >= 0")
        if args.rounds < 1:
            raise UsageError(f"--rounds: {args.rounds}; accepted: an integer >= 1")
        budget = getattr(args, "reference_budget", DEFAULT_BUDGET / 2**20)
        if not budget > 0:
            raise UsageError(f"--reference-budget: {budget}; accepted: megabytes > 0")
        modes = choices("--mode", args.mode, list(MODES))
        if args.cuda_graph and (device.type != "cuda" or modes != ["fwd"]):
            raise UsageError(
                "--cuda-graph: replays a captured forward on CUDA; accepted with "
                "--device cuda and --mode fwd only"
            )
        mechanisms = (
            attn_zoo.names()
            if args.mechanisms == "all"
            else choices("--mechanisms", args.mechanisms, attn_zoo.names())
        )
        impls = None if args.impls is None else choices("--impls", args.impls, all_impls())
        return cls(
            device=device,
            seq_lens=tuple(positive_ints("--seq-lens", args.seq_lens)),
            mechanisms=tuple(mechanisms),
            impls=tuple(impls) if impls is not None else None,
            dtypes=tuple(choices("--dtype", args.dtype, device_dtypes(device))),
            batches=tuple(positive_ints("--batch", args.batch)),
            heads=tuple(positive_ints("--heads", args.heads)),
            head_dims=tuple(positive_ints("--head-dim", args.head_dim)),
            causal=bool(args.causal),
            modes=tuple(modes),
            repeats=args.repeats,
            min_time=float(args.min_time),
            rounds=int(args.rounds),
            warmup=args.warmup,
            seed=args.seed,
            oracle_rows=args.oracle_rows,
            interpret=bool(args.interpret),
            cuda_graph=bool(args.cuda_graph),
            reference_budget=max(1, int(budget * 2**20)),
        )
