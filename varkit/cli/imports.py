"""``varkit import``: foreign checkpoints to varkit checkpoints."""

from __future__ import annotations

import argparse

from varkit.importers import var as var_release


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "import",
        help="convert foreign checkpoints (the official VAR release) to varkit checkpoints",
        description="Read foreign checkpoint files with torch.load(weights_only=True) and write a varkit "
        "checkpoint directory (safetensors + resolved recipe) that `varkit sample` and varkit.load use.",
    )
    isub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = isub.add_parser("var", help="the official VAR release (vae_ch160v4096z32.pth + var_dN.pth)")
    q.add_argument("--vae", required=True, help="path of vae_ch160v4096z32.pth")
    q.add_argument(
        "--var", required=True, help="path of var_d16.pth / var_d20.pth / var_d24.pth / var_d30.pth"
    )
    q.add_argument("--out", required=True, help="output checkpoint directory")
    commands["import"] = _import


def _import(args: argparse.Namespace) -> int:
    out = var_release.import_release(args.vae, args.var, args.out)
    print(out)
    return 0
