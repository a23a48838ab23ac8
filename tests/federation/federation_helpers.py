"""What the in-process federation tests share: a small micro federation and an independent mean.

Imported by module name (pytest puts this folder on ``sys.path``; tests/ has no packages).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def micro_federation(path: Path, **fields) -> Path:
    """A federation YAML at ``path``: micro recipe, 1-step epochs, 2 local steps, evaluation on.

    With 1-step epochs X-ray and CT epochs alternate every 2 steps, so 2 rounds x 2 steps make
    a site with both kinds of data train both dimensions. ``fields`` override the top level.
    """
    body = {
        "recipe": str(REPO / "configs" / "pretrain" / "micro.yaml"),
        "recipe_overrides": {"ssl": {"steps_per_epoch": 1, "batch_size_2d": 2,
                                     "batch_size_3d": 1, "threads": 1}},
        "local_steps": 2, "min_sites": 2, "round_timeout": 600, "evaluate": True,
        "eval_batches": 1, "poll_interval": 0.05, **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def exchange_kind(name: str) -> str:
    """``2d``/``3d``/``shared`` from a tensor name, written apart from the code under test."""
    inner = name.split(".", 1)[1] if "." in name else name
    parts = inner.split(".")
    return ("3d" if any(p.endswith("_3d") for p in parts)
            else "2d" if any(p.endswith("_2d") for p in parts) else "shared")


def expected_mean(global_state, replies):
    """Independent dimension-aware weighted mean (float64) of (state, samples_2d, samples_3d)."""
    out = {}
    for name, value in global_state.items():
        kind, num, den = exchange_kind(name), torch.zeros(value.shape, dtype=torch.float64), 0.0
        for state, s2, s3 in replies:
            w = {"3d": s3, "2d": s2, "shared": s2 + s3}[kind]
            if w > 0:
                num += w * state[name].double()
                den += w
        out[name] = (num / den).float() if den else value
    return out
