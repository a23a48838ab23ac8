"""``fed-unimiss data check`` and ``fed-unimiss data phantom``.

``data check PATH... [--json] [--config YAML]`` scans folders as a site would (see
:mod:`fed_unimiss.data.scan`) and prints a table of usable images plus every rejected file with
its reason; ``--json`` prints one object ``{"usable": [...], "rejected": [{path, reason}],
"summary": {...}}``. Exit 0 when at least one image is usable, 2 when none, 1 on a usage error.
Paths appear in this output: the command runs at the site, for the site's own staff.

``data phantom OUT --ct N --xray M [--labels] [--seed S] [--format ...]`` writes the built-in
phantom data (see :mod:`fed_unimiss.data.phantom`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register"]


def _usage_error_exits_1(parser: argparse.ArgumentParser) -> None:
    """argparse exits 2 on bad usage; this command reserves 2 for "no usable image"."""

    def error(message: str) -> None:
        parser.print_usage(sys.stderr)
        parser.exit(1, f"{parser.prog}: error: {message}\n")

    parser.error = error  # type: ignore[method-assign]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data check`` and ``data phantom`` to the ``fed-unimiss`` parser."""
    data = subparsers.add_parser("data", help="check a site's image folder; generate phantoms")
    _usage_error_exits_1(data)
    sub = data.add_subparsers(dest="data_command", metavar="{check,phantom}")

    check = sub.add_parser("check", help="scan folders and report usable and rejected images",
                           description="Scan folders as the site client would and report, for "
                           "each image, whether it will be used; rejected files come with the "
                           "reason. Exit 0 if anything is usable, 2 if nothing is, 1 on usage "
                           "errors.")
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                       help="folders (or files) to scan; symbolic links are followed safely")
    check.add_argument("--json", action="store_true",
                       help="print one JSON object (usable, rejected, summary) instead of tables")
    check.add_argument("--config", type=Path, default=None,
                       help="data settings YAML (default: built-in defaults, as "
                       "configs/data/default.yaml); changes e.g. the minimum slice count")
    _usage_error_exits_1(check)
    check.set_defaults(func=run_check)

    phantom = sub.add_parser("phantom", help="write labelled CT and X-ray phantoms",
                             description="Write procedural CT phantoms (DICOM series and "
                             "NIfTI) and DRR-style radiographs (DICOM and PNG); the same seed "
                             "writes the same bytes.")
    phantom.add_argument("out", type=Path, metavar="OUT", help="output folder (created)")
    phantom.add_argument("--ct", type=int, default=2, help="number of CT cases (0 for an "
                         "X-ray-only site)")
    phantom.add_argument("--xray", type=int, default=2, help="number of radiographs (0 for a "
                         "CT-only site)")
    phantom.add_argument("--labels", action="store_true",
                         help="also write organ label maps and labels.csv under OUT/labels/")
    phantom.add_argument("--lateral", action="store_true",
                         help="with --labels: label the kidneys by side (3 kidney_right, "
                         "6 kidney_left), a task that a left-right flip corrupts")
    phantom.add_argument("--seed", type=int, default=0, help="give each simulated site its own "
                         "seed so sites hold different patients")
    phantom.add_argument("--format", dest="fmt", default="alternate",
                         choices=("alternate", "dicom", "nifti", "both"),
                         help="CT file format; 'alternate' writes each case once, DICOM and "
                         "NIfTI in turn ('both' makes a scan count every case twice)")
    _usage_error_exits_1(phantom)
    phantom.set_defaults(func=run_phantom)

    data.set_defaults(func=lambda args: (data.print_help(), 1)[1])


def run_check(args: argparse.Namespace) -> int:
    from fed_unimiss.config import ConfigError
    from fed_unimiss.data.config import DataConfig, load_data_config
    from fed_unimiss.data.scan import scan

    missing = [str(p) for p in args.paths if not p.exists() and not p.is_symlink()]
    if missing:
        print(f"fed-unimiss data check: error: no such file or folder: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    try:
        cfg = load_data_config(args.config) if args.config else DataConfig()
    except ConfigError as e:
        print(f"fed-unimiss data check: error: {e}", file=sys.stderr)
        return 1
    report = scan(args.paths, cfg)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_tables(report)
    return 0 if report.usable else 2


def _spacing_text(spacing: tuple[float, ...] | None) -> str:
    return "unknown" if spacing is None else " x ".join(f"{s:.3g}" for s in spacing)


NAME_MIN_WIDTH = 16  # a unique tail (fed_unimiss/cli/names.py) still says which file it is
CELL_FRAME = 3  # "│ " before a cell's text and " " after it; one more "│" closes the row


def _longest_word(texts: list[str]) -> int:
    return max((len(word) for text in texts for word in text.split()), default=1)


def fit_columns(console_width: int, headers: tuple[str, ...], rows: list[list[str]],
                name_col: int) -> list[int]:
    """Column widths that fit the terminal without cutting a word.

    Every column gets its natural width where there is room. Otherwise the name column gives
    way first (down to ``NAME_MIN_WIDTH``: names are then shown by their unique tail), then the
    others, the widest first, wrap at spaces down to their longest word. Left to itself, rich
    keeps the name column's minimum and crops the table's right edge: "usable" read "usabl".
    """
    cells = [[h, *(r[i] for r in rows)] for i, h in enumerate(headers)]
    natural = [max(map(len, column)) for column in cells]
    least = [_longest_word(column) for column in cells]
    least[name_col] = min(natural[name_col], max(NAME_MIN_WIDTH, len(headers[name_col])))
    widths = list(natural)
    excess = sum(widths) - (console_width - CELL_FRAME * len(headers) - 1)
    others = sorted((i for i in range(len(headers)) if i != name_col),
                    key=lambda i: natural[i] - least[i], reverse=True)
    for i in (name_col, *others):
        cut = max(0, min(excess, widths[i] - least[i]))
        widths[i] -= cut
        excess -= cut
    return widths


def _print_tables(report) -> None:
    """The usable and rejected tables. Names are relative to the scanned folder and, where the
    terminal is too narrow, shortened from the left to a tail that no other name shares
    (fed_unimiss/cli/names.py): two files never print the same."""
    from rich.console import Console
    from rich.table import Table

    from fed_unimiss.cli.names import unique_tails

    console = Console()
    headers = ("modality", "image", "files", "shape", "spacing (mm)", "status")
    rows = [[u.modality, u.name, str(len(u.files)), " x ".join(map(str, u.shape)),
             _spacing_text(u.spacing),
             "usable" + ("; " + "; ".join(u.notes) if u.notes else "")] for u in report.usable]
    widths = fit_columns(console.width, headers, rows, 1)
    names = unique_tails([r[1] for r in rows], widths[1])
    table = Table(title="Usable images", title_justify="left")
    for column, width in zip(headers, widths, strict=True):
        # a unique tail longer than its column folds, whole; other cells wrap at spaces
        table.add_column(column, width=width, overflow="fold")
    for row, name in zip(rows, names, strict=True):
        table.add_row(row[0], name, *row[2:])
    console.print(table)
    if report.rejected:
        paths = [report.display_path(r.path) for r in report.rejected]
        width = max(16, console.width * 2 // 5)
        shown = unique_tails(paths, width)
        rejected = Table(title="Rejected", title_justify="left")
        rejected.add_column("path", overflow="fold", min_width=min(width, max(map(len, shown))))
        rejected.add_column("reason", overflow="fold")
        for path, r in zip(shown, report.rejected, strict=True):
            rejected.add_row(path, r.reason)
        console.print(rejected)
    s = report.summary()
    unknown = sum(u.modality == "xray" and u.spacing is None for u in report.usable)
    console.print(f"{s['ct_volumes']} CT volume(s), {s['xrays']} X-ray(s) usable; "
                  f"{s['rejected']} rejected; {s['files_seen']} file(s) seen")
    if unknown:
        console.print(f"{unknown} X-ray(s) record no pixel spacing (\"unknown\"): training "
                      "uses data.xray_default_spacing")
    if not report.usable:
        console.print("[bold red]no usable image found[/]")


def run_phantom(args: argparse.Namespace) -> int:
    from fed_unimiss.data.phantom import write_phantoms

    if args.ct < 0 or args.xray < 0:
        print("fed-unimiss data phantom: error: --ct and --xray must be 0 or more",
              file=sys.stderr)
        return 1
    if args.ct == 0 and args.xray == 0:
        print("fed-unimiss data phantom: error: nothing to write (--ct 0 --xray 0)",
              file=sys.stderr)
        return 1
    if args.lateral and not args.labels:
        print("fed-unimiss data phantom: error: --lateral needs --labels", file=sys.stderr)
        return 1
    result = write_phantoms(args.out, args.ct, args.xray, labels=args.labels, seed=args.seed,
                            fmt=args.fmt, lateral=args.lateral)
    print(f"wrote {len(result.ct)} CT and {len(result.xray)} X-ray phantom(s) to {args.out}"
          + (f" (labels in {args.out / 'labels'})" if args.labels else ""))
    return 0
