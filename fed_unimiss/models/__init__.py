"""Models: the UniMiSS MiT (2D/3D switchable patch embedding), its decoder and the DINO head.

``create_model(preset_or_config, **overrides)`` builds a :class:`UniMiSSNet` (``.backbone`` MiT +
``.head`` DINOHead); ``classify_parameters(model)`` tells which tensors are 2D-specific,
3D-specific or shared. See ``mit.py`` for shapes and the deliberate differences from the
reference code.
"""

from .classify import classify_parameters, count_by_class, dimension_of, parameters_of_class
from .head import DINOHead
from .mit import MiT, MiTFeatures, encoder_grids
from .model_config import ModelConfig
from .net import UniMiSSNet
from .registry import MODELS, PRESETS, create_model, get_config, list_presets

__all__ = [
    "MODELS",
    "PRESETS",
    "DINOHead",
    "MiT",
    "MiTFeatures",
    "ModelConfig",
    "UniMiSSNet",
    "classify_parameters",
    "count_by_class",
    "create_model",
    "dimension_of",
    "encoder_grids",
    "get_config",
    "list_presets",
    "parameters_of_class",
]
