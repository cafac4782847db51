"""``varkit plugins``: the registered plugins, whether they can run here, and which
attention kernel each attention backend runs on this machine."""

from __future__ import annotations

import argparse

import torch

from varkit.cli.common import device_or_default
from varkit.masks import BlockCausal
from varkit.plugins import KINDS, registry
from varkit.scales import VAR_256

#: The layouts an attention backend is described for: VAR's scales, and the 16×16 code
#: map of the raster units (next-patch with 2×2 cells, next-token).
LAYOUTS = (
    ("scale, VAR 256 px (10 steps, 680 positions)", BlockCausal([n * n for n in VAR_256])),
    ("patch k=2, 16×16 codes (64 steps of 4)", BlockCausal([4] * 64)),
    ("token, 16×16 codes (256 steps of 1)", BlockCausal([1] * 256)),
    ("a cached generation step", None),
)


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "plugins", help="list the registered plugins, whether they can run here, and the attention kernels"
    )
    p.add_argument("--kind", choices=list(KINDS), help="only this kind")
    p.add_argument(
        "--device",
        default=None,
        help="device the attention kernels are described for (default cuda when available)",
    )
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
    if args.kind in (None, "attention"):
        _kernels(reg, torch.device(device_or_default(args.device)))
    return 0


def _kernels(reg, device: torch.device) -> None:
    """Which kernel every available attention backend runs for each layout, on ``device``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"\nattention kernels on {device} ({dtype_name}, heads of 64 channels; training masks):")
    width = max(len(name) for name, _ in LAYOUTS)
    for entry in reg:
        if entry.kind != "attention" or not entry.available()[0]:
            continue
        backend = entry.cls()
        print(f"  {entry.name}")
        for name, mask in LAYOUTS:
            print(f"    {name.ljust(width)}  {backend.kernel(mask, device=device, dtype=dtype, head_dim=64)}")
