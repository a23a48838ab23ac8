"""DP-SGD for the student: per-patient gradients, Opacus clipping and noise, one step.

Per-sample gradients come from ``torch.func`` (``vmap`` over patients of ``grad`` of one
patient's loss, computed with ``functional_call`` on the real student), and are handed to Opacus's
:class:`~opacus.optimizers.DPOptimizer`, which clips every row to ``max_grad_norm``, adds Gaussian
noise of std ``noise_multiplier x max_grad_norm``, divides by the *expected* batch size (Poisson
sampling) and steps the wrapped optimiser. Accounting is Opacus's too (``privacy.ledger``).

Why ``torch.func`` and not GradSampleModule's hooks: a patient's row must be the gradient of the
patient's whole loss - both views, and for CT the 2 x view_depth slices sent through the 2D path -
while hooks attribute rows to positions in each forward's batch. Concatenating views or slices
along the batch would silently make several rows per patient (multiplying the sensitivity), and
modules whose output has no batch axis (the CLS token) get no per-sample gradient from hooks at
all. Under ``vmap`` each patient runs the ordinary forward on its own tensors, so one patient is
one row by construction; the tests compare every row with a one-patient-at-a-time backward.

Also handled here, from the known Opacus traps: an empty Poisson batch still takes a noisy step
(zero rows, so the update is pure noise, as the analysis assumes); the DINO "freeze the last
layer" is an lr = 0 parameter group (zeroing gradients before the step would not stop the noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "PerSampleLoss",
    "per_sample_gradients",
    "DPSGD",
    "noised_mean",
]

# loss(forward, *one_patient_tensors) -> scalar loss of that patient. ``forward(x)`` runs the
# student on a batch ``x`` (with a batch axis) and returns its output.
PerSampleLoss = Callable[..., Tensor]


@contextmanager
def _vmap_friendly_attention() -> Iterator[None]:
    """Use the math SDPA kernel: it is made of ops ``vmap`` batches (the fused CPU kernel has no
    batching rule and falls back to a slow per-sample loop)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def per_sample_gradients(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    inputs: Sequence[Any],
    params: dict[str, nn.Parameter] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Gradient of ``loss_fn`` for every sample of ``inputs`` (stacked along dim 0).

    Args:
        model: the module whose trainable parameters the gradients are taken for; its buffers
            are passed through unchanged.
        loss_fn: one sample's loss, see :data:`PerSampleLoss`. It receives each input without
            the batch axis.
        inputs: tensors (or pytrees of tensors) whose dim 0 is the sample axis, all equal length.
        params: the parameters to differentiate (default: every ``requires_grad`` parameter).

    Returns:
        ``(grads, losses)``: ``grads[name]`` is (B, *param.shape), ``losses`` is (B,).
    """
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())
    detached = {n: p.detach() for n, p in params.items()}

    def one_sample(p: dict[str, Tensor], *sample: Any) -> Tensor:
        state = {**frozen, **buffers, **p}

        def forward(x: Tensor) -> Tensor:
            return functional_call(model, state, (x,))

        return loss_fn(forward, *sample)

    in_dims = (None,) + (0,) * len(inputs)
    with _vmap_friendly_attention():
        grads, losses = vmap(grad_and_value(one_sample), in_dims=in_dims)(detached, *inputs)
    return grads, losses


def noised_mean(
    rows: Tensor,
    clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gaussian mechanism on a Poisson sample: clip each row to L2 ``clip``, sum, add
    N(0, (noise_multiplier x clip)^2), divide by the expected batch size. ``rows`` may be empty.

    Used for the DINO center under DP (``center: gaussian``); one patient changes the sum by at
    most ``clip``.
    """
    if rows.ndim != 2:
        raise ValueError(f"rows must be (B, D), got shape {tuple(rows.shape)}")
    norms = rows.norm(dim=1, keepdim=True)
    clipped = rows * (clip / (norms + 1e-6)).clamp(max=1.0)
    total = clipped.sum(dim=0, keepdim=True)  # (1, D); zeros for an empty batch
    noise = torch.normal(0.0, noise_multiplier * clip, size=total.shape, generator=generator)
    return (total + noise.to(total)) / expected_batch_size


class DPSGD:
    """One DP-SGD step of ``model``: per-patient gradients -> Opacus DPOptimizer -> update.

    Args:
        model: the student (its trainable parameters must all be in ``optimizer``).
        optimizer: the ordinary optimiser (e.g. AdamW with an lr = 0 group to freeze a layer).
        noise_multiplier: noise std / max_grad_norm (from the ledger).
        max_grad_norm: per-patient L2 clip.
        expected_batch_size: sample_rate x patients, the divisor of the noisy sum.
        generator: noise generator (reproducible tests); ignored in secure mode.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.model = model
        # Opacus types expected_batch_size as int but only divides by it; keep the exact value.
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,  # type: ignore[arg-type]
            loss_reduction="mean",
            generator=None if secure_mode else generator,
            secure_mode=secure_mode,
        )

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def step(self, loss_fn: PerSampleLoss, inputs: Sequence[Any], batch_size: int) -> Tensor:
        """Compute per-patient gradients of ``loss_fn`` on ``inputs`` and take one noisy step.

        ``batch_size`` may be 0 (an empty Poisson sample): no forward runs, every parameter gets
        zero rows and the step applies noise only. Returns the per-patient losses (B,).
        """
        params = self._trainable()
        for group in self.optimizer.param_groups:  # parameters unfrozen after construction
            for p in group["params"]:
                if not hasattr(p, "summed_grad"):
                    p.summed_grad = None
        managed = {id(p) for p in self.optimizer.params}
        missing = [n for n, p in params.items() if id(p) not in managed]
        if missing:
            raise ValueError(f"trainable parameters not in the optimizer: {missing[:5]}")
        if batch_size > 0:
            grads, losses = per_sample_gradients(self.model, loss_fn, inputs, params)
        else:
            grads = {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
            losses = torch.zeros(0)
        for name, p in params.items():
            p.grad_sample = grads[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses.detach()

    def per_sample_norms(self) -> Tensor:
        """Norms of the last step's rows before clipping (diagnostics; empty after zero_grad)."""
        rows = [p.grad_sample.reshape(len(p.grad_sample), -1) for p in self.optimizer.params
                if getattr(p, "grad_sample", None) is not None]
        if not rows:
            return torch.zeros(0)
        return torch.cat(rows, dim=1).norm(dim=1)
