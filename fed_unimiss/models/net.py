"""``UniMiSSNet``: the module self-distillation trains, MiT backbone + DINO projection head."""

from __future__ import annotations

from torch import Tensor, nn

from .head import DINOHead
from .mit import MiT
from .model_config import ModelConfig

__all__ = ["UniMiSSNet"]


class UniMiSSNet(nn.Module):
    """``backbone`` (MiT encoder + decoder) followed by ``head`` (DINO projection head).

    ``forward(x)`` takes (B, 3, H, W) X-rays/slices or (B, 1, D, H, W) volumes and returns the
    head logits (B, head_out_dim); ``backbone(x)`` alone gives the 48-d decoder CLS embedding.
    State-dict names are ``backbone.<...>`` and ``head.<...>``; their 2D/3D/shared class comes
    from :func:`fed_unimiss.models.classify_parameters`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = MiT(cfg)
        self.head = DINOHead(
            cfg.out_dim,
            cfg.head_out_dim,
            hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=cfg.head_bottleneck_dim,
            nlayers=cfg.head_nlayers,
            weight_norm=cfg.head_weight_norm,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))  # (B, head_out_dim)
