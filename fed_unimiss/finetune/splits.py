"""Train / validation splits of a labelled folder: official lists, or by patient, never leaking.

A benchmark number is only comparable when its split is the published one, and only honest when
no patient is on both sides (several X-rays of one patient look alike: a model that saw one of
them in training "recognises" the others). Hence:

- ``split: lists`` honours the official split lists (NIH's ``train_val_list.txt`` and
  ``test_list.txt``: one image name per line) shipped in the folder;
- ``split: patients`` makes a split here: a seeded permutation of the folder's *patients* (NIH's
  ``Patient ID`` column, a ``patient`` column in ``labels.csv``; for segmentation cases, which
  carry no patient, each case counts as one), of which ``val_fraction`` are held out;
- whatever the split, :func:`check_patient_disjoint` refuses a training and validation set that
  share a patient, when both sides know their patients.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from .labels import LabelError

__all__ = ["held_out_patients", "read_split_list", "split_key", "check_patient_disjoint"]


def held_out_patients(patients: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """The validation patients: ``round(val_fraction x P)`` of the P distinct ones (1..P-1).

    Seeded and independent of row order (patients are sorted before the permutation), so the
    training side and the validation side of one folder, loaded separately, agree.
    """
    unique = sorted(set(patients))
    if len(unique) < 2:
        raise LabelError(f"split: patients needs at least 2 patients, found {len(unique)}")
    n_val = min(max(1, int(round(val_fraction * len(unique)))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i] for i in order[:n_val]}


def read_split_list(path: Path, field: str) -> set[str]:
    """Names listed one per line (blank lines ignored); a missing file names the config field."""
    try:
        text = path.read_text()
    except OSError as e:
        raise LabelError(f"{path}: cannot read the split list of {field} ({e.strerror}); "
                         f"put it in the folder or use split: patients") from e
    names = {line.strip() for line in text.splitlines() if line.strip()}
    if not names:
        raise LabelError(f"{path}: the split list of {field} is empty")
    return names


def split_key(name: str) -> str:
    """How a row or case is matched against a split list: its file name without folders."""
    return Path(name).name


def check_patient_disjoint(train: Sequence[Hashable | None], val: Sequence[Hashable | None],
                           what: str) -> None:
    """Refuse a split where a patient is on both sides (checked when both sides know patients).

    Only the count is reported: patient identifiers stay out of logs.
    """
    if not train or not val or any(p is None for p in (*train, *val)):
        return
    shared = set(train) & set(val)
    if shared:
        raise LabelError(f"{what}: {len(shared)} patient(s) are in both the training and the "
                         "validation set; a split must keep each patient on one side "
                         "(use split: patients, or the official split lists)")
