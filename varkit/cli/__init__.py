"""The ``varkit`` command line.

Every subcommand has ``--help``. Errors a user can cause (`VarkitError`) print
as one paragraph on stderr and exit with status 2; argparse's own usage errors exit
with 2 as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from varkit.cli import edit, evaluate, imports, metrics, plugins, run, sample, shards
from varkit.errors import VarkitError
from varkit.version import __version__

log = logging.getLogger("varkit")

Command = Callable[[argparse.Namespace], int]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="varkit",
        description="Visual autoregressive image generation: train, sample, edit, evaluate, import.",
    )
    parser.add_argument("--version", action="version", version=f"varkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands: dict[str, Command] = {}

    for module in COMMAND_MODULES:
        module.add_commands(sub, commands)
    return parser, commands


#: The subcommand modules. Each has ``add_commands(sub, commands)``: it adds its
#: parsers to ``sub`` and its handlers (``Namespace -> exit status``) to ``commands``
#: under the subcommand's name.
COMMAND_MODULES = (plugins, run, sample, edit, evaluate, metrics, shards, imports)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was when the
    handler was made (callers that capture or replace stderr, as test runners do, would
    otherwise leave it writing to a closed stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Configure output for the CLI: rank 0 logs INFO, other ranks only warnings."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    # Overrides may follow flags (`varkit run R --print train.steps=5`), which argparse
    # does not gather into one positional list: collect the stray key=value words here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.verbose)
    try:
        return commands[args.command](args)
    except VarkitError as exc:
        print(f"varkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("varkit: interrupted", file=sys.stderr)
        return 130
