"""``varkit plugins``: the registered plugins and whether they can run here."""

from __future__ import annotations

import argparse

from varkit.plugins import KINDS, registry


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser("plugins", help="list the registered plugins and whether they can run here")
    p.add_argument("--kind", choices=list(KINDS), help="only this kind")
    commands["plugins"] = _plugins


def _plugins(args: argparse.Namespace) -> int:
    reg = registry()
    rows = []
    for entry in reg:
        if args.kind and entry.kind != args.kind:
            continue
        ok, why = entry.available()
        rows.append((KINDS[entry.kind].title, entry.name, entry.distribution, "yes" if ok else f"no: {why}"))
    header = ("kind", "name", "distribution", "available")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    for broken in reg.broken:
        print(f"broken  {broken.distribution}: {broken.error} ({broken.source})")
    return 0
