"""Which tensors are 2D-specific, 3D-specific or shared, decided from state-dict names alone.

The rule, in one place: a tensor is ``"2d"`` if any dotted component of its name ends in
``_2d``, ``"3d"`` if any ends in ``_3d``, and ``"shared"`` otherwise. The MiT names every
dimension-specific module that way (``stem_2d``, ``patch_embed_3d``, ``pos_embed_2d``,
``attn.sr_3d``, ``decoder.up_2d``...), so the rule works on a bare ``MiT``, on a ``UniMiSSNet``
and on any wrapper that prefixes the names (``student.backbone.encoder.stem_3d.conv.weight``).
Freezing 3D tensors during X-ray epochs and dimension-aware federated averaging both use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from torch import nn

__all__ = [
    "TensorClass",
    "DIM_2D",
    "DIM_3D",
    "SHARED",
    "dimension_of",
    "classify_parameters",
    "parameters_of_class",
    "count_by_class",
]

TensorClass = Literal["2d", "3d", "shared"]
DIM_2D: TensorClass = "2d"
DIM_3D: TensorClass = "3d"
SHARED: TensorClass = "shared"
_CLASSES = (DIM_2D, DIM_3D, SHARED)


def dimension_of(name: str) -> TensorClass:
    """Class of one state-dict / parameter name (see the module docstring for the rule)."""
    parts = name.split(".")
    is_2d = any(p.endswith("_2d") for p in parts)
    is_3d = any(p.endswith("_3d") for p in parts)
    if is_2d and is_3d:
        raise ValueError(f"tensor name {name!r} is marked both _2d and _3d; rename the module")
    return DIM_2D if is_2d else DIM_3D if is_3d else SHARED


def classify_parameters(model: nn.Module) -> dict[str, TensorClass]:
    """Map every parameter and buffer name of ``model.state_dict()`` to "2d", "3d" or "shared"."""
    return {name: dimension_of(name) for name in model.state_dict()}


def _check_class(cls: str) -> None:
    if cls not in _CLASSES:
        raise ValueError(f"tensor class must be one of {list(_CLASSES)}, got {cls!r}")


def parameters_of_class(model: nn.Module, cls: str) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of ``model`` whose class is ``cls``.

    E.g. freeze the 3D-specific part for an X-ray epoch::

        for _, p in parameters_of_class(student, "3d"):
            p.requires_grad_(False)
    """
    _check_class(cls)
    for name, p in model.named_parameters():
        if dimension_of(name) == cls:
            yield name, p


def count_by_class(model: nn.Module) -> dict[str, int]:
    """Number of parameter elements per class (buffers excluded), e.g. for logs and benchmarks."""
    counts = dict.fromkeys(_CLASSES, 0)
    for name, p in model.named_parameters():
        counts[dimension_of(name)] += p.numel()
    return counts
