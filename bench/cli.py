"""``bench``: run a sweep, list mechanisms, draw reports, gate regressions.

Every bad argument exits with status 2 and one line naming the problem and
the accepted values, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

from attn_zoo.bench.errors import UsageError

DEFAULT_SEQ_LENS = "512,2048,8192"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2
        raise UsageError(message)


def positive_ints(flag: str, text: str) -> list[int]:
    values = []
    for item in text.split(","):
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
    values = [item.strip() for item in text.split(",") if item.strip()]
    if not values:
        raise UsageError(f"{flag}: empty; accepted: {', '.join(accepted)}")
    for value in values:
        if value not in accepted:
            raise UsageError(f"{flag}: unknown {value!r}; accepted: {', '.join(accepted)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="sweep mechanisms x implementations x sequence lengths")
    run.add_argument(
        "--seq-lens", default=DEFAULT_SEQ_LENS, help="comma-separated (default %(default)s)"
    )
    run.add_argument("--mechanisms", default="all", help="comma-separated registry keys, or all")
    run.add_argument(
        "--impls",
        default=None,
        help="comma-separated; default: every implementation that runs natively here",
    )
    run.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    run.add_argument("--dtype", default="float32", help="comma-separated (default float32)")
    run.add_argument("--batch", default="1", help="comma-separated (default 1)")
    run.add_argument("--heads", default="8", help="comma-separated (default 8)")
    run.add_argument("--head-dim", default="64", help="comma-separated (default 64)")
    run.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="causal attention (default) or --no-causal",
    )
    run.add_argument("--mode", default="fwd", help="fwd | fwd_bwd, comma-separated (default fwd)")
    run.add_argument("--repeats", type=int, default=5, help="timed calls per case (default 5)")
    run.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    run.add_argument("--seed", type=int, default=0, help="inputs and oracle row sample (default 0)")
    run.add_argument(
        "--oracle-rows",
        type=int,
        default=512,
        help="query rows checked against the oracle when N is larger (default 512)",
    )
    run.add_argument(
        "--interpret",
        action="store_true",
        help="run Triton kernels in Triton's CPU interpreter (slow; small N only)",
    )
    run.add_argument("--out", default="results", help="folder for run folders (default results)")
    run.add_argument("--run-id", default=None, help="run folder name (default <device>-<time>)")
    run.add_argument(
        "--resume",
        default=None,
        metavar="RUN_FOLDER",
        help="finish an interrupted run, keeping its rows and settings",
    )

    lst = sub.add_parser("list", help="registered mechanisms, configs, implementations")
    lst.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    lst.add_argument("--interpret", action="store_true", help="count the Triton interpreter in")

    report = sub.add_parser("report", help="plots and report.md from run folders")
    report.add_argument("runs", nargs="+", help="run folders")
    report.add_argument("--out", default=None, help="report folder (default reports/<run-id>)")

    compare = sub.add_parser("compare", help="gate a candidate run against a baseline")
    compare.add_argument("baseline")
    compare.add_argument("candidate")
    compare.add_argument("--time-tol", type=float, default=0.10, help="default 0.10 (10%%)")
    compare.add_argument("--mem-tol", type=float, default=0.05, help="default 0.05 (5%%)")
    compare.add_argument("--force", action="store_true", help="compare runs from different devices")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "interpret", False):
            os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        if args.command == "run":
            from attn_zoo.bench.sweep import run_sweep

            return run_sweep(args)
        if args.command == "list":
            from attn_zoo.bench.listing import list_mechanisms

            return list_mechanisms(args)
        if args.command == "report":
            from attn_zoo.bench.report import run_report

            return run_report(args)
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
