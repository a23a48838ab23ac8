"""Entry point of the ``fed-unimiss`` command.

Each subcommand lives next to the code it drives and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
Only the module of the chosen subcommand is imported, so ``fed-unimiss data check`` never pays for
Flower's import and the science package never imports flwr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

# name -> (module that registers it, one-line help shown in `fed-unimiss --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("fed_unimiss.data.cli", "check a site's image folder; generate phantom data"),
    "pretrain": ("fed_unimiss.ssl.cli", "centralized / single-site self-distillation"),
    "export": ("fed_unimiss.finetune.export_cli", "export a checkpoint as a loadable model"),
    "finetune": ("fed_unimiss.finetune.cli", "fine-tune a pretrained model on a 2D/3D task"),
    "simulate": ("aggregator.simulate_cli", "run a federation in one process (no sockets)"),
    "provision": ("aggregator.provision_cli", "create the consortium CA, certificates and kits"),
    "aggregator": ("aggregator.cli", "start or inspect the coordinator's aggregator"),
    "site": ("site_client.cli", "start a hospital's site client"),
    "demo": ("aggregator.demo", "a whole federation on loopback with built-in data"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 (argparse's default is 2, which our commands reserve for "no data")."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; only ``selected`` gets its full sub-parser (importing its module)."""
    parser = _Parser(
        prog="fed-unimiss",
        description="Federated UniMiSS pretraining for medical imaging.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name == selected:
            importlib.import_module(module_name).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected not in COMMANDS:
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
