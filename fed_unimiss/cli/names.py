"""Names in a table narrower than they are: shortened from the left, never made equal.

Every table the CLI prints (``data check``'s usable and rejected files, site labels in
``aggregator status`` and the demo) shows names through :func:`unique_tails`: a name that fits
stays whole; a longer one loses path components from the left ("…/case-0001/IM-0001.dcm") but
keeps enough of them to differ from every other name in the table. Truncating on the right, as
a table does by default, turned 19 files of one folder into 19 identical "refdata/UniMiS…".
JSON output never goes through this: it keeps the full relative paths.
"""

from __future__ import annotations

__all__ = ["unique_tails", "ELLIPSIS"]

ELLIPSIS = "…/"


def _tails(name: str) -> list[str]:
    """Suffixes of ``name`` at its path separators, shortest first (the name itself last)."""
    parts = name.split("/")
    return ["/".join(parts[-k:]) for k in range(1, len(parts) + 1)]


def _clashes(tail: str, name: str, others: list[str]) -> bool:
    """True when another name ends with the same path tail (it could read the same)."""
    return any(o != name and (o == tail or o.endswith("/" + tail)) for o in others)


def unique_tails(names: list[str], width: int) -> list[str]:
    """``names`` as a table of ``width`` columns shows them: distinct names stay distinct.

    A name longer than ``width`` becomes ``…/`` + its longest tail of whole path components
    that fits and that no other name ends with; failing that, ``…`` + its last ``width - 1``
    characters if no other name ends with them; failing that, its shortest unique tail (longer
    than ``width``: the table folds it). Names that are equal in the input stay equal.
    """
    out = []
    for name in names:
        if len(name) <= width:
            out.append(name)
            continue
        unique = [t for t in _tails(name)[:-1] if not _clashes(t, name, names)]
        fitting = [t for t in unique if len(ELLIPSIS) + len(t) <= width]
        chars = name[-(width - 1):] if width > 1 else ""
        if fitting:
            out.append(ELLIPSIS + fitting[-1])
        elif chars and not any(o != name and o.endswith(chars) for o in names):
            out.append("…" + chars)
        elif unique:
            out.append(ELLIPSIS + unique[0])
        else:
            out.append(name)
    return out
