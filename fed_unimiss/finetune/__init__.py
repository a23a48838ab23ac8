"""Fine-tuning and evaluation: from an aggregated pretraining checkpoint to 2D and 3D tasks.

- :func:`export_checkpoint` (``fed-unimiss export``): checkpoint -> publishable model directory;
- :func:`load_pretrained`: that directory -> a plain ``nn.Module`` (no Flower needed);
- :func:`finetune` (``fed-unimiss finetune``): seg3d / seg2d / cls3d / cls2d with metrics.json.

Pure PyTorch; nothing here imports flwr.
"""

from .config import FinetuneConfig, load_finetune_config
from .export import export_checkpoint
from .load import load_pretrained
from .trainer import finetune

__all__ = ["FinetuneConfig", "load_finetune_config", "export_checkpoint", "load_pretrained",
           "finetune"]
