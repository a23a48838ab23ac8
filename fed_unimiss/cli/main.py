"""Entry point of the ``fed-unimiss`` command.

Subcommands are not listed here: every installed package declares its own in the
``fed_unimiss.commands`` entry-point group of its pyproject.toml (``name = "module:register"``).
``register(subparsers)`` adds the subcommand's parser and sets ``func`` (a callable taking the
parsed namespace and returning an exit code). Only the module of the chosen subcommand is
imported, so ``fed-unimiss data check`` never pays for Flower's import, and the science package
neither imports nor names the packages built on it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import NoReturn

COMMAND_GROUP = "fed_unimiss.commands"


def commands() -> dict[str, EntryPoint]:
    """The installed subcommands by name; two packages claiming one name is an error."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=COMMAND_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise RuntimeError(f"subcommand {ep.name!r} is registered twice: by {ep.value} and "
                               f"{found[ep.name].value}; uninstall one of the packages")
        found[ep.name] = ep
    return found


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 (argparse's default is 2, which our commands reserve for "no data")."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; ``selected`` (or, for the overview, every command) gets its full
    sub-parser, which imports its module."""
    parser = _Parser(
        prog="fed-unimiss",
        description="Federated UniMiSS pretraining for medical imaging.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, ep in commands().items():
        if selected is None or name == selected:
            ep.load()(sub)
        else:
            sub.add_parser(name, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected not in commands():
        selected = None
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "func"):
        parser.print_help()
        return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
