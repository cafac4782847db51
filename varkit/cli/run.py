"""``varkit run`` and ``varkit validate``: train what a recipe describes, or only check it."""

from __future__ import annotations

import argparse
import logging
import sys

from varkit import recipe as recipe_mod
from varkit.cli.common import OVERRIDE_HELP
from varkit.data.sources import check_patterns
from varkit.errors import VarkitError
from varkit.loading import check_tokenizer_weights
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
        help="check a recipe and what it names, and report every problem at once",
        description="Run the same validation as `run` without training (one `file:line: key.path: message` "
        "line per problem), then check what can be checked without running: the shard patterns name "
        "existing shards of the right kind (pipe: and remote urls are not run), and tokenizer.weights "
        "exists and has the keys and shapes of the tokenizer (read from the file's header where the "
        "format allows). Exit status 2 when there is any problem.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    p.add_argument(
        "--schema-only", action="store_true", help="check the recipe itself only, not the files it names"
    )
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
        recipe = recipe_mod.load(args.recipe, args.overrides)
    except VarkitError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not args.schema_only:
        problems = [f"{args.recipe}: {p}" for p in check_patterns(recipe.data)]
        try:
            check_tokenizer_weights(recipe)
        except VarkitError as exc:
            problems.append(f"{args.recipe}: tokenizer.weights: {exc}")
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 2
    print(f"{args.recipe}: ok" + (" (schema only)" if args.schema_only else ""))
    return 0
