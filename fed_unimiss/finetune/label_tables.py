"""Classification label tables: ``file,label[,patient]`` and NIH's ``Data_Entry_2017.csv``.

Two formats, told apart by the header, both read as they come:

- ``file,label`` (optionally ``,patient``): ``file`` relative to the table's folder; ``label`` an
  integer class, or for multi-label tasks finding names separated by ``|``.
- NIH ChestX-ray14 ``Data_Entry_2017.csv``: ``Image Index`` (a bare PNG name somewhere under
  the folder, e.g. ``images_001/images/``), ``Finding Labels`` (findings separated by ``|``;
  ``No Finding`` means every class is negative) and ``Patient ID``; other columns are ignored.

Reading keeps the table's line numbers so that every later problem (a file that is missing, a
finding outside ``class_names``) names the table and the line. Files are located only for the
rows a split selects (:func:`resolve_files`), so a partial download fails on what it lacks.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .labels import LabelError

__all__ = ["TableRow", "ClassTable", "read_class_table", "read_label_csv", "resolve_files",
           "class_names_of", "multi_hot", "NIH_COLUMNS"]

# NIH's column names (file, findings, patient), exactly as in Data_Entry_2017.csv.
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz", ".mhd")


@dataclass(frozen=True)
class TableRow:
    """One labelled file. ``target``: an int class, or a tuple of finding names (multi-label)."""

    file: str
    target: int | tuple[str, ...]
    patient: str | None
    line: int


@dataclass(frozen=True)
class ClassTable:
    path: Path
    rows: list[TableRow]
    nih: bool  # NIH layout: files are bare names to be found anywhere under the folder

    @property
    def has_patients(self) -> bool:
        return all(r.patient for r in self.rows)


def _findings(cell: str, negative: str, where: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in cell.split("|") if n.strip())
    if negative in names:
        if len(names) > 1:
            raise LabelError(f"{where}: {negative!r} together with findings {cell!r}; "
                             f"{negative!r} means every class is negative")
        return ()
    if len(set(names)) != len(names):
        raise LabelError(f"{where}: a finding is listed twice in {cell!r}")
    return names


def read_class_table(
    path: str | Path, *, multi_label: bool, num_classes: int | None = None,
    negative_label: str = "No Finding",
) -> ClassTable:
    """Parse a label table (either format); errors name the table and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise LabelError(f"{path}: cannot read label table ({e.strerror})") from e
    lines = list(csv.reader(text.splitlines()))
    header = [c.strip() for c in lines[0]] if lines else []
    nih = all(c in header for c in NIH_COLUMNS[:2])
    if nih:
        file_col, label_col = header.index(NIH_COLUMNS[0]), header.index(NIH_COLUMNS[1])
        patient_col = header.index(NIH_COLUMNS[2]) if NIH_COLUMNS[2] in header else None
        if not multi_label:
            raise LabelError(f"{path}: an NIH table ('Finding Labels') is multi-label; set "
                             "multi_label: true (configs/finetune/chestx-ray14.yaml)")
    elif [c.lower() for c in header[:2]] == ["file", "label"]:
        file_col, label_col = 0, 1
        lower = [c.lower() for c in header]
        patient_col = lower.index("patient") if "patient" in lower else None
    else:
        raise LabelError(f"{path}: first line must be the header 'file,label' (optionally "
                         "',patient'), or NIH's 'Image Index,Finding Labels,...,Patient ID'")
    rows: list[TableRow] = []
    seen: set[str] = set()
    for lineno, row in enumerate(lines[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}:{lineno}"
        if len(row) <= max(file_col, label_col, patient_col or 0):
            raise LabelError(f"{where}: expected {len(header)} columns, got {','.join(row)!r}")
        file, raw = row[file_col].strip(), row[label_col].strip()
        target: int | tuple[str, ...]
        if multi_label:
            target = _findings(raw, negative_label, where)
        else:
            try:
                target = int(raw)
            except ValueError:
                raise LabelError(f"{where}: label {raw!r} is not an integer class") from None
            if target < 0 or (num_classes is not None and target >= num_classes):
                hi = f"..{num_classes - 1}" if num_classes is not None else " or more"
                raise LabelError(f"{where}: label {target} is outside the class range 0{hi}")
        if file in seen:
            raise LabelError(f"{where}: {file} is listed twice")
        seen.add(file)
        patient = row[patient_col].strip() if patient_col is not None else None
        if patient_col is not None and not patient:
            raise LabelError(f"{where}: empty patient cell; every row needs its patient")
        rows.append(TableRow(file, target, patient or None, lineno))
    if not rows:
        raise LabelError(f"{path}: the label table lists no files")
    return ClassTable(path, rows, nih)


def _image_index(root: Path) -> dict[str, Path]:
    """Image files under ``root`` by file name (NIH ships them in images_NNN/images/)."""
    index: dict[str, Path] = {}
    for p in root.rglob("*"):
        if p.name.startswith(".") or not p.name.lower().endswith(_IMAGE_SUFFIXES):
            continue
        if p.name in index:
            raise LabelError(f"{root}: two images named {p.name} ({index[p.name]} and {p}); "
                             "names in the table must be unique under the folder")
        index[p.name] = p
    return index


def resolve_files(table: ClassTable, rows: Sequence[TableRow], root: str | Path) -> list[Path]:
    """The image file of every row: relative to ``root`` (``file,label``) or found by name (NIH)."""
    root = Path(root)
    index = _image_index(root) if table.nih else {}
    out = []
    for row in rows:
        target = index.get(row.file) if table.nih else (root / row.file).resolve()
        if target is None or not target.exists():
            under = f" under {root}" if table.nih else ""
            raise LabelError(f"{table.path}:{row.line}: {row.file} does not exist{under}")
        out.append(target)
    return out


def read_label_csv(
    path: str | Path, num_classes: int | None = None, base: str | Path | None = None
) -> dict[Path, int]:
    """Read a ``file,label`` table; files are relative to ``base`` (default: the CSV's folder).

    Every problem names the CSV and the line: missing header, a non-integer or out-of-range
    label, a duplicate or missing file. It is :func:`read_class_table` for single-label tables
    without patients, with the files resolved.
    """
    path = Path(path)
    table = read_class_table(path, multi_label=False, num_classes=num_classes)
    files = resolve_files(table, table.rows, base if base is not None else path.parent)
    return {f: int(r.target) for f, r in zip(files, table.rows, strict=True)}  # type: ignore[arg-type]


def class_names_of(rows: Sequence[TableRow]) -> tuple[str, ...]:
    """The sorted finding names of multi-label rows."""
    return tuple(sorted({n for r in rows for n in r.target}))  # type: ignore[union-attr]


def multi_hot(row: TableRow, names: Sequence[str], table: Path) -> np.ndarray:
    """(K,) float32 targets of a multi-label row; a finding outside ``names`` is an error."""
    vector = np.zeros(len(names), np.float32)
    position = {n: i for i, n in enumerate(names)}
    for finding in row.target:  # type: ignore[union-attr]
        if finding not in position:
            raise LabelError(f"{table}:{row.line}: finding {finding!r} is not one of the "
                             f"classes {list(names)}; add it to class_names or fix the row")
        vector[position[finding]] = 1.0
    return vector
