"""Self-distillation (the UniMiSS recipe): loss, schedules, views, the engine, pretraining.

The public API others build on:

- :class:`Recipe`, :func:`load_recipe`, :func:`recipe_from_dict`, :func:`recipe_to_dict`,
  :class:`SSLConfig` (``config.py``);
- :class:`SelfDistillation` (``engine.py``), the one trainer of centralized pretraining and of
  the federated site client, with :class:`SiteData` and :class:`TrainStats`; its gradient step is
  ``PlainStep`` (``gradient_step.py``) or ``DPStep`` (``dp_step.py``), and ``run_local``
  (``local.py``) runs it under a budget guard;
- :func:`xray_step_loss`, :func:`ct_step_loss`, ``patient_step_loss`` (``steps.py``), the only
  loss code;
- :class:`DINOLoss`, :class:`Schedules`, :func:`phase_at`, :func:`collapse_stats`,
  :class:`CollapseWatch`;
- :func:`pretrain` (``trainer.py``) behind ``fed-unimiss pretrain`` (``cli.py``).
"""

from fed_unimiss.ssl.collapse import CollapseStats, CollapseWatch, collapse_stats
from fed_unimiss.ssl.config import Recipe, SSLConfig, load_recipe, recipe_from_dict, recipe_to_dict
from fed_unimiss.ssl.dino_loss import DINOLoss
from fed_unimiss.ssl.engine import SelfDistillation, TrainStats
from fed_unimiss.ssl.schedules import Schedules, cosine_at, phase_at, phase_steps_before
from fed_unimiss.ssl.site_data import SiteData
from fed_unimiss.ssl.steps import StepOutput, ct_step_loss, slice_logits, xray_step_loss

__all__ = [
    "CollapseStats", "CollapseWatch", "collapse_stats", "Recipe", "SSLConfig", "load_recipe",
    "recipe_from_dict", "recipe_to_dict", "DINOLoss", "SelfDistillation", "TrainStats",
    "Schedules", "cosine_at", "phase_at", "phase_steps_before", "SiteData", "StepOutput",
    "ct_step_loss", "slice_logits", "xray_step_loss",
]
