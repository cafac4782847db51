"""``varkit run`` and ``varkit validate``: train what a recipe describes, or only check it."""

from __future__ import annotations

import argparse
import logging
import sys

from varkit import recipe as recipe_mod
from varkit.cli.common import OVERRIDE_HELP
from varkit.errors import VarkitError
from varkit.train import run

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "run",
        help="train what a recipe describes (tokenizer, then AR model), then sample",
        description="Train what a recipe describes. On an existing out_dir of the same recipe, resume "
        "from its latest checkpoint. Runs under torchrun as well: "
        "`torchrun --nproc_per_node N -m varkit run RECIPE`.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    p.add_argument("--print", action="store_true", help="print the fully resolved recipe and exit")
    p.add_argument(
        "--force", action="store_true", help="use out_dir even if it holds a run of another recipe"
    )
    commands["run"] = _run

    p = sub.add_parser(
        "validate",
        help="check a recipe and report every problem at once",
        description="Run the same validation as `run` without training; one `file:line: key.path: message` "
        "line per problem; exit status 2 when there is any.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    commands["validate"] = _validate


def _run(args: argparse.Namespace) -> int:
    recipe = recipe_mod.load(args.recipe, args.overrides)
    if args.print:
        sys.stdout.write(recipe.to_yaml())
        return 0
    out = run(recipe, force=args.force)
    log.info("done: %s", out)
    return 0


def _validate(args: argparse.Namespace) -> int:
    try:
        recipe_mod.load(args.recipe, args.overrides)
    except VarkitError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.recipe}: ok")
    return 0
