"""Which axes a training flip may mirror without corrupting a label.

A left-right flip turns the right kidney into a left kidney that is still labelled "right": on a
task with lateral labels (left/right kidney, lung, adrenal; the liver on the right, the spleen on
the left) every such flip teaches the network a wrong label, however well flips serve symmetric
tasks. The readers put every volume and slice in the axial DICOM layout (rows anterior ->
posterior, columns patient right -> left; :mod:`fed_unimiss.data.nifti`), and a radiograph is
viewed the same way, so the left-right axis is always the last array axis, and the
anterior-posterior (or cranio-caudal, on a radiograph) axis the one before it.

Whether labels are lateral comes from ``lateral_labels`` in the config, else from the class names
(dataset.json or ``class_names``): a name that says left or right marks the task lateral. With no
names at all the task is treated as lateral: a flip that is left out costs a little augmentation,
a flip that corrupts labels costs the task.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["LEFT_RIGHT_AXIS", "is_lateral_name", "labels_are_lateral", "flip_axes"]

# The array axis that runs patient right -> left, in 2D and 3D alike (see the module docstring).
LEFT_RIGHT_AXIS = -1
_ANTERIOR_POSTERIOR_AXIS = -2
# Whole words (after splitting snake_case, camelCase, spaces, dots and dashes) that name a side.
_SIDE_WORDS = {"left", "right", "l", "r", "lt", "rt", "sinister", "dexter", "sin", "dex"}
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def is_lateral_name(name: str) -> bool:
    """True if a class name says which side it is on ("kidney_left", "RightLung", "Lung L")."""
    words = {w.lower() for w in _WORD.findall(name)}
    return bool(words & _SIDE_WORDS) or any(s in name.lower() for s in ("left", "right"))


def labels_are_lateral(setting: bool | None, names: Sequence[str] | None) -> bool:
    """The config's ``lateral_labels`` if set, else whether any class name names a side.

    Unknown names (no dataset.json, no ``class_names``) count as lateral: see the module
    docstring for why that is the safe side.
    """
    if setting is not None:
        return setting
    if not names:
        return True
    return any(is_lateral_name(n) for n in names)


def flip_axes(spatial_dims: int, lateral: bool) -> tuple[int, ...]:
    """The in-plane axes a training patch may be flipped along (never the slice axis).

    The slice axis has a direction (head to feet) in every CT, so it is never flipped; the
    left-right axis only when no label is lateral.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return (_ANTERIOR_POSTERIOR_AXIS,) if lateral else (LEFT_RIGHT_AXIS, _ANTERIOR_POSTERIOR_AXIS)
