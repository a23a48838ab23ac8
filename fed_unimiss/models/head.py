"""DINO projection head, as used by UniMiSS (DINO, Caron et al. 2021; facebookresearch/dino).

MLP (Linear-GELU x (nlayers-1), Linear to a bottleneck), L2-normalisation, then a last linear
layer without bias onto ``out_dim`` prototypes whose rows have unit norm. Two ways to keep the
rows at unit norm:

- ``weight_norm=True`` (the reference): the last layer is weight-normalised, ``w = g * v/|v|``
  with ``g`` fixed at 1 (``weight_g`` does not train). Parameters are named ``weight_g`` and
  ``weight_v`` as in DINO/UniMiSS checkpoints.
- ``weight_norm=False`` (DP runs): a plain ``nn.Linear(bottleneck, out_dim, bias=False)``, which
  Opacus can compute per-sample gradients for; the trainer calls
  :meth:`DINOHead.renormalize_last_layer` after every optimiser step to put the rows back on
  the unit sphere (a projected-gradient version of the same constraint).

The last layer is always ``head.last_layer`` because the trainer freezes it for the first epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WeightNormLinear", "DINOHead"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` (row-wise), ``g`` frozen at 1.

    Written out instead of ``torch.nn.utils.weight_norm`` (deprecated) or its parametrization
    (which renames the state-dict keys), so checkpoints keep DINO's ``weight_g``/``weight_v``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=False)

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        # = F.linear(x, self.weight), without building the normalised (out, in) matrix.
        return _WeightNormLinearFn.apply(x, self.weight_v, self.weight_g)[0]


class _WeightNormLinearFn(torch.autograd.Function):
    """``x @ (g * v / ||v||)^T`` computed as ``(x @ v^T) * s`` with ``s = g / ||v||`` per row.

    The same function as building the normalised weight, up to float rounding, but the
    (out, in) matrix is only read: forward reads ``v`` twice (norm, matmul), backward reads it
    twice and writes its gradient once, instead of the half-dozen full-size temporaries autograd
    makes of ``g * v / norm`` (with 65,536 x 256 that matrix is 67 MB, and those passes were
    the largest single cost of a training step). Gradient w.r.t. ``v``:
    ``(go * s)^T x - (s / ||v||^2) * rowsum(go * y) * v`` with ``y = x v^T``; w.r.t. ``g``:
    ``rowsum(go * y) / ||v||``.
    """

    generate_vmap_rule = True  # torch.func.grad/vmap can differentiate through it

    @staticmethod
    def forward(x: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        norm = torch.linalg.vector_norm(v, dim=1)  # (out,)
        scale = g.reshape(-1) / norm  # (out,)
        y = F.linear(x, v)  # (..., out)
        return y * scale, y, scale, norm

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, v, _ = inputs
        _, y, scale, norm = output
        ctx.mark_non_differentiable(y, scale, norm)
        ctx.save_for_backward(x, v, y, scale, norm)
        ctx.g_shape = inputs[2].shape

    @staticmethod
    def backward(ctx, grad_out: Tensor, *_unused: Tensor):
        x, v, y, scale, norm = ctx.saved_tensors
        need_x, need_v, need_g = ctx.needs_input_grad
        # Under autocast the forward's matmul ran in y's dtype (bf16/fp16): so do the backward
        # matmuls, while the per-row scale terms stay fp32. In fp32 every cast is a no-op.
        low = y.dtype
        grad_y = (grad_out * scale).to(low)  # (..., out)
        grad_x = grad_v = grad_g = None
        if need_x:
            grad_x = (grad_y @ v.to(low)).to(x.dtype)
        if need_v or need_g:
            grad_scale = (grad_out.float() * y.float()).reshape(-1, y.shape[-1]).sum(0)  # (out,)
        if need_v:
            x2, grad_y2 = x.to(low).reshape(-1, x.shape[-1]), grad_y.reshape(-1, y.shape[-1])
            grad_v = (grad_y2.t() @ x2).to(v.dtype)  # (out, in)
            coef = -grad_scale * scale / (norm * norm)  # d scale / d v = -scale v / ||v||^2
            if torch._C._are_functorch_transforms_active():  # vmap: no in-place into v's grad
                grad_v = grad_v.addcmul(v, coef.unsqueeze(1))
            else:  # in place: one pass less over the (out, in) matrix
                grad_v.addcmul_(v, coef.unsqueeze(1))
        if need_g:
            grad_g = (grad_scale / norm).reshape(ctx.g_shape)
        return grad_x, grad_v, grad_g


class DINOHead(nn.Module):
    """Projection head trained by self-distillation; ``forward(x (B, in_dim)) -> (B, out_dim)``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer: nn.Module
        if weight_norm:
            self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        else:
            self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
            self.renormalize_last_layer()  # start on the unit sphere, like g = 1

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)  # (B, bottleneck)
        return self.last_layer(x)  # (B, out_dim)

    @torch.no_grad()
    def renormalize_last_layer(self) -> None:
        """Rescale each row of a plain last layer to unit L2 norm (no-op with weight norm).

        Call after every optimiser step when ``weight_norm=False``; together the two give the
        same function class as the reference's weight norm with g fixed at 1.
        """
        if isinstance(self.last_layer, nn.Linear):
            w = self.last_layer.weight
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
