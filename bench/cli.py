"""``bench`` (also ``attn-zoo`` and ``python -m attn_zoo.bench``): run a sweep,
list mechanisms, draw reports, gate regressions.

Every bad argument, and every damaged file a command reads, exits with status
2 and one line naming the problem and the accepted values, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

from attn_zoo.bench.errors import UsageError
from attn_zoo.bench.settings import DEFAULT_SEQ_LENS
from attn_zoo.tiles import DEFAULT_BUDGET

COMMANDS = {
    "run": "sweep mechanisms x implementations x sequence lengths",
    "list": "registered mechanisms, configs, implementations",
    "report": "plots and report.md from run folders",
    "compare": "gate a candidate run against a baseline",
    "quality": "what each mechanism loses: a pretrained model and trained long-range tasks",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2
        if "arguments are required" in message and "{run," in message:
            message = f"a command is needed; accepted: {', '.join(COMMANDS)} (bench COMMAND -h)"
        raise UsageError(message)


def build_parser(explicit: bool = False) -> argparse.ArgumentParser:
    """The command line. ``explicit``: ``bench run`` flags get no defaults, so that
    parsing tells which flags were given (``--resume`` refuses changed settings)."""
    default = (lambda value: argparse.SUPPRESS) if explicit else (lambda value: value)
    parser = _Parser(prog="bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="{" + ",".join(COMMANDS) + "}")  # fmt: skip

    run = sub.add_parser("run", help=COMMANDS["run"])
    add = run.add_argument
    add(
        "--seq-lens",
        default=default(DEFAULT_SEQ_LENS),
        help="comma-separated (default %(default)s)",
    )
    add("--mechanisms", default=default("all"), help="comma-separated registry keys, or all")
    add(
        "--impls",
        default=default(None),
        help="comma-separated; default: every implementation that runs natively here",
    )
    add("--device", default=default("auto"), help="auto | cpu | cuda (default auto)")
    add("--dtype", default=default("float32"), help="comma-separated (default float32)")
    add("--batch", default=default("1"), help="comma-separated (default 1)")
    add("--heads", default=default("8"), help="comma-separated (default 8)")
    add("--head-dim", default=default("64"), help="comma-separated (default 64)")
    add(
        "--causal",
        action=argparse.BooleanOptionalAction,
        default=default(True),
        help="causal attention (default) or --no-causal",
    )
    add(
        "--mode",
        default=default("fwd"),
        help="fwd | fwd_bwd | bwd (backward alone), comma-separated (default fwd)",
    )
    add("--repeats", type=int, default=default(8), help="at least this many timed calls (8)")
    add(
        "--min-time",
        type=float,
        default=default(0.5),
        help="and at least this many seconds of timed calls per case (default 0.5)",
    )
    add(
        "--rounds",
        type=int,
        default=default(4),
        help="passes over the sweep that share each case's timing budget, so that its "
        "samples span the run's changing machine load (default 4)",
    )
    add("--warmup", type=int, default=default(1), help="untimed calls first (default 1)")
    add("--seed", type=int, default=default(0), help="inputs and oracle row sample (default 0)")
    add(
        "--oracle-rows",
        type=int,
        default=default(512),
        help="query rows checked against the oracle when N is larger (default 512)",
    )
    add(
        "--interpret",
        action="store_true",
        default=default(False),
        help="run Triton kernels in Triton's CPU interpreter (slow; small N only)",
    )
    add(
        "--reference-budget",
        type=float,
        default=default(DEFAULT_BUDGET / 2**20),
        metavar="MB",
        help=f"megabytes of scores the references hold per chunk of tiles "
        f"(default {DEFAULT_BUDGET >> 20})",
    )
    add(
        "--cuda-graph",
        action="store_true",
        default=default(False),
        help="time replays of a captured CUDA graph (CUDA, --mode fwd)",
    )
    add("--out", default=default("results"), help="folder for run folders (default results)")
    add("--run-id", default=default(None), help="run folder name (default <device>-<time>)")
    add(
        "--resume",
        default=default(None),
        metavar="RUN_FOLDER",
        help="finish an interrupted run with its own settings (changed settings are refused)",
    )

    lst = sub.add_parser("list", help=COMMANDS["list"])
    lst.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    lst.add_argument("--interpret", action="store_true", help="count the Triton interpreter in")

    report = sub.add_parser("report", help=COMMANDS["report"])
    report.add_argument("runs", nargs="+", help="run folders")
    report.add_argument("--out", default=None, help="report folder (default reports/<run-id>)")
    report.add_argument("--baseline", default=None, metavar="MECHANISM/IMPL",
                        help="what speedups are measured against (default: the fastest dense "
                             "implementation in each run, sdpa where present)")  # fmt: skip

    compare = sub.add_parser("compare", help=COMMANDS["compare"])
    compare.add_argument("baseline")
    compare.add_argument("candidate")
    compare.add_argument("--time-tol", type=float, default=0.10,
                         help="flag a case when its 10th-percentile time ratio exceeds 1 + this "
                              "and its 95%% lower bound exceeds 1 (default 0.10)")  # fmt: skip
    compare.add_argument("--mem-tol", type=float, default=0.05, help="default 0.05 (5%%)")
    compare.add_argument("--force", action="store_true", help="compare runs from different devices")

    from attn_zoo.bench.quality import add_arguments

    add_arguments(sub.add_parser("quality", help=COMMANDS["quality"]))
    return parser


def given_flags(argv: list[str]) -> dict:
    """The ``bench run`` flags present on the command line, with their values."""
    return vars(build_parser(explicit=True).parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "interpret", False):
            os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        if args.command == "run":
            from attn_zoo.bench.sweep import run_sweep

            return run_sweep(args, given_flags(argv))
        if args.command == "list":
            from attn_zoo.bench.listing import list_mechanisms

            return list_mechanisms(args)
        if args.command == "report":
            from attn_zoo.bench.report import run_report

            return run_report(args)
        if args.command == "quality":
            from attn_zoo.bench.quality import run_quality

            return run_quality(args)
        from attn_zoo.bench.compare import run_compare

        return run_compare(args)
    except UsageError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bench: interrupted at {dt.datetime.now():%H:%M:%S}; rows written so far are kept "
              "(continue with --resume RUN_FOLDER)", file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
