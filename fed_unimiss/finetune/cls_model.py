"""Classification network on the pretrained MiT encoder: a linear head on CLS + mean token.

As in the UniMiSS RICORD / ChestXR downstream models: the last encoder stage's CLS token and the
mean of its patch tokens are concatenated (2 x embed_dims[-1]), normalised and fed to a linear
classifier. Only the encoder is used, so a model loaded with ``parts="encoder"`` is enough.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ClassificationNet"]


class ClassificationNet(nn.Module):
    """``forward(x)`` -> logits (B, num_classes) for 2D (B, 3, H, W) or 3D (B, 1, D, H, W)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:  # 1 logit is a valid multi-label (sigmoid) head
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        width = backbone.config.embed_dims[-1]
        self.backbone = backbone
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def new_parameters(self) -> list[nn.Parameter]:
        return [*self.norm.parameters(), *self.fc.parameters()]

    def features(self, x: Tensor) -> Tensor:
        """(B, 2 x embed_dims[-1]): last-stage CLS token next to the mean patch token."""
        feats = self.backbone.forward_intermediates(x, decoder=False)
        cls = feats.encoder_cls[-1]  # (B, C)
        mean_tok = feats.encoder_maps[-1].flatten(2).mean(dim=2)  # (B, C)
        return torch.cat([cls, mean_tok], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(self.features(x)))
