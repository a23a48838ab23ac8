"""Rewrite the part of a doc between two HTML comment markers, keeping the prose around them
(docs/quality.md holds one such part per quality report)."""

from __future__ import annotations

__all__ = ["replace_section"]


def replace_section(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with what lies between the markers replaced by ``body`` (markers appended
    when missing); the prose around them is kept."""
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"
