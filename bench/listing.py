"""``bench list``: the registry, each mechanism's config and where its
implementations run."""

from __future__ import annotations

import argparse
import dataclasses

from rich.table import Table

import attn_zoo
from attn_zoo.bench.console import make_console
from attn_zoo.bench.devices import resolve_device


def list_mechanisms(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    table = Table(title=f"attn-zoo mechanisms (implementations on {device.type})")
    for column in ("mechanism", "paper", "attends to", "config", "implementations"):
        table.add_column(column, overflow="fold")
    for name in attn_zoo.names():
        mech = attn_zoo.get(name)
        config = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(mech.config).items())
        impls = []
        for impl in mech.impls.values():
            why = impl.unavailable(device)
            if why:
                impls.append(f"[dim]{impl.name}: no ({why})[/dim]")
            else:
                tag = " (interpreter)" if impl.interpreted(device) else ""
                tag += "" if impl.default_on(device) else " (not in the default sweep)"
                impls.append(f"[green]{impl.name}[/green]{tag}")
        table.add_row(name, mech.citation, mech.summary, config or "-", "\n".join(impls))
    make_console().print(table)
    return 0
