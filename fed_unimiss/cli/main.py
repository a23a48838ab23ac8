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


# Exit codes shared by every subcommand (docs/coordinator-guide.md, "Exit codes"): a usage
# error (unknown flag, missing argument, no command) is refused before anything runs, like any
# other bad input; a reader that closed our output early (`| head`) ends us as SIGPIPE would.
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE


class _Parser(argparse.ArgumentParser):
    """Usage errors exit :data:`EXIT_USAGE`, with the usage line and what is wrong."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


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


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush finds no closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (e.g. captured by a test)
        pass
    finally:
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit code.

    A reader that stops early (``fed-unimiss aggregator status | head``) closes the pipe; the
    next write fails with BrokenPipeError, in whichever subcommand. That ends the command
    quietly here, once for all of them, instead of with a traceback.
    """
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # buffered output to a pipe fails here, not at exit
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected not in commands():
        selected = None
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
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
