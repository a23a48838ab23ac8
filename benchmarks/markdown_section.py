"""Write one benchmark's section of docs/benchmarks.md, leaving every other section untouched.

Each benchmark owns one ``## ...`` section; several may be re-run independently, so the file is
re-read right before writing and only the matching section is replaced (or appended).
"""

from __future__ import annotations

import re
from pathlib import Path


def replace_section(path: Path, heading: str, section: str) -> None:
    """Replace the section starting at ``heading`` with ``section`` (which starts with it)."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = section.strip("\n") + "\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")
