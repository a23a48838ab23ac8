"""Optimizer helpers shared by pretraining and fine-tuning: AdamW decay groups, cosine schedule.

Both trainers decay matrices but not biases and norm weights, and both warm up linearly into a
half cosine; written once here so the two cannot drift. Schedules are closed-form functions of
the global step (DINO's ``cosine_scheduler`` arrays, evaluated one step at a time), so a run can
stop after any step and resume exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import nn

__all__ = ["decay_groups", "cosine_at", "cosine_schedule"]


def decay_groups(model: nn.Module, weight_decay: float = 0.0, apart: str | None = None,
                 apart_name: str = "apart") -> list[dict[str, Any]]:
    """AdamW parameter groups: ``decay`` (ndim > 1) and ``no_decay`` (biases, norms, 1-D).

    Frozen tensors (``requires_grad`` False) are left out. Parameters whose name starts with
    ``apart`` form a third, decayed group ``apart_name`` (DINO's head last layer, which has its
    own freezing rule). Every group records ``name``, its parameter ``names`` (optimizer state
    is saved by name) and ``decays``, so a schedule can set the decay of the decayed groups.
    """
    keys = ["decay", "no_decay"] + ([apart_name] if apart else [])
    groups: dict[str, dict[str, list]] = {k: {"params": [], "names": []} for k in keys}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (apart_name if apart and name.startswith(apart)
               else "decay" if p.ndim > 1 else "no_decay")
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [{"name": k, "params": v["params"], "names": v["names"], "decays": k != "no_decay",
             "weight_decay": weight_decay if k != "no_decay" else 0.0}
            for k, v in groups.items()]


def cosine_at(step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0,
              warmup_start: float = 0.0, warmup_inclusive: bool = False) -> float:
    """Linear warm-up from ``warmup_start`` to ``base``, then half a cosine from ``base`` to ``final``.

    Steps at or past ``total_steps`` return ``final`` (a run extended past its plan stays at the
    floor instead of wrapping around the cosine). ``warmup_inclusive`` counts step 0 as the first
    warm-up increment (fine-tuning: no step at ``warmup_start``); pretraining follows DINO and
    starts at ``warmup_start``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    if step < warmup_steps:
        done = step + 1 if warmup_inclusive else step
        return warmup_start + (base - warmup_start) * done / warmup_steps
    if step >= total_steps:
        return final
    span = total_steps - warmup_steps
    t = (step - warmup_steps) / span
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """The whole schedule as an array of ``total_steps`` values (DINO's ``cosine_scheduler``)."""
    return np.array([cosine_at(s, base, final, total_steps, warmup_steps, warmup_start)
                     for s in range(total_steps)])
