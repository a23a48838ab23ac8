"""A micro pretraining checkpoint as the trainer writes it, for tests that export or probe one.

Untrained weights (student and teacher drawn apart from one seed): what is tested is the path
from a checkpoint to a model, never what the weights learnt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fed_unimiss.checkpoint import save_checkpoint
from fed_unimiss.config import to_dict
from fed_unimiss.models import create_model


def micro_checkpoint(run: Path, name: str, seed: int, meta: dict[str, Any] | None = None
                     ) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """(checkpoint path, student, teacher); ``meta`` joins the record (its ``run`` entries
    beside the recipe)."""
    torch.manual_seed(seed)
    student, teacher = create_model("micro"), create_model("micro")
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    state["center"] = torch.zeros(1, student.config.head_out_dim)
    meta = dict(meta or {})
    run_record = {"recipe": {"model": to_dict(student.config)}, **meta.pop("run", {})}
    record = {"run": run_record, **meta}
    return save_checkpoint(run, name, state, record), student, teacher
