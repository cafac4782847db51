"""``varkit import``: released checkpoints to varkit pretrained directories."""

from __future__ import annotations

import argparse

from varkit.importers import llamagen as llamagen_release
from varkit.importers import var as var_release


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "import",
        help="convert released checkpoints (VAR, LlamaGen) to varkit pretrained directories",
        description="Read released checkpoint files with torch.load(weights_only=True) and write a pretrained "
        "directory (model.safetensors, tokenizer.safetensors, the resolved recipe.yaml and a README model card) "
        "that varkit.from_pretrained, `varkit sample`, `varkit eval`, tokenizer.weights and init.weights use.",
    )
    isub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = isub.add_parser("var", help="the official VAR release (vae_ch160v4096z32.pth + var_dN.pth)")
    q.add_argument("--vae", required=True, help="path of vae_ch160v4096z32.pth")
    q.add_argument(
        "--var", required=True, help="path of var_d16.pth / var_d20.pth / var_d24.pth / var_d30.pth"
    )
    q.add_argument("--out", required=True, help="output directory")
    q = isub.add_parser(
        "llamagen",
        help="LlamaGen's class-conditional release (vq_ds16_c2i.pt + c2i_{B,L,XL,XXL,3B}_{256,384}.pt)",
        description="Convert LlamaGen's VQ tokenizer and, with --gpt, a class-conditional GPT. Without --gpt the "
        "directory holds the tokenizer alone, for a recipe's tokenizer.weights.",
    )
    q.add_argument("--vq", required=True, help="path of vq_ds16_c2i.pt")
    q.add_argument("--gpt", help="path of c2i_B_256.pt, c2i_L_384.pt, ... (omit for the tokenizer alone)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument(
        "--image-size", type=int, help="image size the GPT was trained at (default: read from its file name)"
    )
    q.add_argument("--heads", type=int, help="attention heads of a GPT of a size outside the release's")
    commands["import"] = _import


def _import(args: argparse.Namespace) -> int:
    if args.format == "llamagen":
        out = llamagen_release.import_release(
            args.vq, args.gpt, args.out, image_size=args.image_size, heads=args.heads
        )
    else:
        out = var_release.import_release(args.vae, args.var, args.out)
    print(out)
    return 0
