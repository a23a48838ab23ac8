"""DP-SGD for the student: per-patient gradients, Opacus clipping and noise, one step.

Per-sample gradients come from ``torch.func`` (``vmap`` over patients of ``grad`` of one
patient's loss, computed with ``functional_call`` on the real student). Each patient's row is
clipped to ``max_grad_norm`` over all tensors (Opacus's flat clipping rule) and the rows are summed
here; Opacus's :class:`~opacus.optimizers.DPOptimizerFastGradientClipping` adds Gaussian noise of
std ``noise_multiplier x max_grad_norm`` to the sums, divides by the *expected* batch size
(Poisson sampling) and steps the wrapped optimiser. Accounting is Opacus's too
(``privacy.ledger``).

Why ``torch.func`` and not GradSampleModule's hooks: a patient's row must be the gradient of the
patient's whole loss - both views, and for CT the 2 x view_depth slices sent through the 2D path -
while hooks attribute rows to positions in each forward's batch. Concatenating views or slices
along the batch would silently make several rows per patient (multiplying the sensitivity), and
modules whose output has no batch axis (the CLS token) get no per-sample gradient from hooks at
all. Under ``vmap`` each patient runs the ordinary forward on its own tensors, so one patient is
one row by construction; the tests compare every row with a one-patient-at-a-time backward.

Ghost clipping of linear layers (``ghost=``): the DINO head's last layer (256 x 65,536 on
``tiny``, 40 % of the student) would cost one 67 MB gradient per patient. A linear layer's
weight gradient for one patient is sum_c g_c^T x_c over the R rows the layer saw in that
patient's loss (g the gradient w.r.t. its output rows, x its input rows), so its norm follows
from two R x R Gram matrices and the clipped sum over patients is one matmul; the per-patient
matrix is never built (Li et al. 2022; Opacus's fast gradient clipping). That is cheaper only
when R^2 < in x out, so a candidate layer is ghost-clipped only then ("mixed ghost clipping",
Bu et al. 2022): the head's layers (R = 2 views, or 2 + 2 x view_depth for CT) and the coarse
transformer stages are; the fine stages, with hundreds of tokens per view, are not. g comes out
of the same ``vmap`` as the other rows, as the gradient w.r.t. a zero tensor added to the
layer's output; biases keep ordinary per-patient rows.

Also handled here, from the known Opacus traps: an empty Poisson batch still takes a noisy step
(zero rows, so the update is pure noise, as the analysis assumes); the DINO "freeze the last
layer" is an lr = 0 parameter group (zeroing gradients before the step would not stop the noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "PerSampleLoss",
    "per_sample_gradients",
    "GhostFactors",
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


@dataclass
class GhostFactors:
    """The per-patient gradient of a bias-free linear layer, kept factored.

    ``grad_out`` (B, R, out) and ``inputs`` (B, R, in): the R output-gradient and input rows of
    the layer's calls within each patient's loss; the patient's weight gradient is
    ``grad_out[b].T @ inputs[b]``.
    """

    grad_out: Tensor
    inputs: Tensor

    def sq_norms(self) -> Tensor:
        """(B,) squared Frobenius norms of the per-patient weight gradients, via Gram matrices."""
        gg = torch.einsum("bro,bso->brs", self.grad_out, self.grad_out)
        xx = torch.einsum("bri,bsi->brs", self.inputs, self.inputs)
        return (gg * xx).sum(dim=(1, 2))

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """sum_b weights[b] x (patient b's weight gradient), shape (out, in), in one matmul."""
        g = (self.grad_out * weights.view(-1, 1, 1)).reshape(-1, self.grad_out.shape[-1])
        return g.T @ self.inputs.reshape(-1, self.inputs.shape[-1])

    def rows(self) -> Tensor:
        """(B, out, in): the materialised per-patient gradients (tests and diagnostics only)."""
        return torch.einsum("bro,bri->boi", self.grad_out, self.inputs)


def _check_ghost_module(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"ghost clipping needs an nn.Linear; {name} is {type(module).__name__}")
    return module


def linear_layers(model: nn.Module) -> tuple[str, ...]:
    """Names of every ``nn.Linear`` in ``model``: the ghost-clipping candidates."""
    return tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear))


def _ghost_call_shapes(model: nn.Module, loss_fn: PerSampleLoss, sample: Sequence[Any],
                       names: Sequence[str]) -> dict[str, list[tuple[int, ...]]]:
    """Output shapes of every call of each ghost layer in one patient's loss (a no-grad probe:
    the zero tensors that carry the output gradients must exist before the loss runs)."""
    shapes: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _a, out, n=n: shapes[n].append(tuple(out.shape))) for n in names]
    try:
        with torch.no_grad():
            loss_fn(model, *sample)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _ghost_pays(module: nn.Linear, shapes: list[tuple[int, ...]]) -> bool:
    """Factored rows (Gram matrices R x R) cost less than one (out, in) matrix per patient."""
    rows = sum(math.prod(s[:-1]) for s in shapes)
    return rows * rows < module.in_features * module.out_features


def per_sample_gradients(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    inputs: Sequence[Any],
    params: dict[str, nn.Parameter] | None = None,
    ghost: Sequence[str] = (),
    shape_cache: dict[Any, dict[str, list[tuple[int, ...]]]] | None = None,
) -> tuple[dict[str, Tensor | GhostFactors], Tensor]:
    """Gradient of ``loss_fn`` for every sample of ``inputs`` (stacked along dim 0).

    Args:
        model: the module whose trainable parameters the gradients are taken for; its buffers
            are passed through unchanged.
        loss_fn: one sample's loss, see :data:`PerSampleLoss`. It receives each input without
            the batch axis.
        inputs: tensors (or pytrees of tensors) whose dim 0 is the sample axis, all equal length.
        params: the parameters to differentiate (default: every ``requires_grad`` parameter).
        ghost: names of ``nn.Linear`` submodules that may have their weight gradients returned
            as :class:`GhostFactors` instead of (B, out, in) tensors: those whose weight is in
            ``params`` and whose rows per patient R satisfy R^2 < in x out.
        shape_cache: where to keep the probed call shapes of the ghost layers, keyed by the
            loss function's name and the per-sample input shapes (saves one patient's forward
            per step).

    Returns:
        ``(grads, losses)``: ``grads[name]`` is (B, *param.shape) or, for a ghost layer's
        ``<module>.weight``, its :class:`GhostFactors`; ``losses`` is (B,).
    """
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ghost = [n for n in ghost if f"{n}.weight" in params]
    for name in ghost:
        _check_ghost_module(model, name)
    shapes: dict[str, list[tuple[int, ...]]] = {}
    if ghost and inputs:
        key = (getattr(loss_fn, "__qualname__", id(loss_fn)), tuple(ghost),
               tuple(tuple(x.shape[1:]) for x in inputs))
        cached = shape_cache.get(key) if shape_cache is not None else None
        shapes = cached or _ghost_call_shapes(model, loss_fn, [x[0] for x in inputs], ghost)
        if shape_cache is not None:
            shape_cache[key] = shapes
    ghost = [g for g in ghost if shapes.get(g) and _ghost_pays(model.get_submodule(g), shapes[g])]
    params = {n: p for n, p in params.items() if n not in {f"{g}.weight" for g in ghost}}
    frozen = {n: p for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())
    detached = {n: p.detach() for n, p in params.items()}
    n = len(inputs[0]) if inputs else 0
    zeros = {g: [torch.zeros((n, *s)) for s in shapes[g]] for g in ghost}

    def one_sample(p: dict[str, Tensor], deltas: dict[str, list[Tensor]],
                   *sample: Any) -> tuple[Tensor, dict[str, Tensor]]:
        state = {**frozen, **buffers, **p}
        seen: dict[str, list[Tensor]] = {g: [] for g in ghost}

        def tap(name: str) -> Callable[..., Tensor]:
            def hook(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
                k = len(seen[name])
                if k >= len(deltas[name]):
                    raise RuntimeError(f"{name} was called more often than in the probe")
                seen[name].append(args[0].reshape(-1, args[0].shape[-1]))
                return out + deltas[name][k]
            return hook

        handles = [model.get_submodule(g).register_forward_hook(tap(g)) for g in ghost]
        try:
            def forward(x: Tensor) -> Tensor:
                return functional_call(model, state, (x,))

            loss = loss_fn(forward, *sample)
        finally:
            for h in handles:
                h.remove()
        return loss, {g: torch.cat(seen[g]) for g in ghost}

    in_dims = (None, 0 if ghost else None) + (0,) * len(inputs)
    with _vmap_friendly_attention():
        (grads, d_out), (losses, x_in) = vmap(
            grad_and_value(one_sample, argnums=(0, 1), has_aux=True), in_dims=in_dims,
        )(detached, zeros, *inputs)
    result: dict[str, Tensor | GhostFactors] = dict(grads)
    for g in ghost:
        rows = torch.cat([d.reshape(n, -1, d.shape[-1]) for d in d_out[g]], dim=1)
        result[f"{g}.weight"] = GhostFactors(rows, x_in[g])
    return result, losses.detach()


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
    device = generator.device if generator is not None else total.device
    noise = torch.normal(0.0, noise_multiplier * clip, size=total.shape, generator=generator,
                         device=device)
    return (total + noise.to(total)) / expected_batch_size


class _NoiseOnSums(DPOptimizerFastGradientClipping):
    """Opacus's optimiser for gradients that are already clipped sums (here: ``p.grad`` set by
    :meth:`DPSGD.step`). It adds the noise, scales by the expected batch size and steps; the only
    change is that the clipped sum is handed on as it is instead of deep-copied first (one copy
    of the whole student per step, ~0.14 GB on ``tiny``)."""

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.data)
            else:
                p.summed_grad = p.grad.data


class DPSGD:
    """One DP-SGD step of ``model``: per-patient gradients -> clipping -> Opacus noise -> update.

    Per-patient rows are clipped to ``max_grad_norm`` jointly over all parameters (Opacus's flat
    clipping: factor min(1, C / (norm + 1e-6))) and summed here, because the ``ghost`` layers'
    rows are never materialised; Opacus's :class:`DPOptimizerFastGradientClipping` then adds
    the Gaussian noise (std ``noise_multiplier x max_grad_norm``) to every sum, divides by the
    expected batch size (Poisson sampling) and steps the wrapped optimiser.

    Args:
        model: the student (its trainable parameters must all be in ``optimizer``).
        optimizer: the ordinary optimiser (e.g. AdamW with an lr = 0 group to freeze a layer).
        noise_multiplier: noise std / max_grad_norm (from the ledger).
        max_grad_norm: per-patient L2 clip.
        expected_batch_size: sample_rate x patients, the divisor of the noisy sum.
        generator: noise generator (reproducible tests); ignored in secure mode.
        ghost: linear submodules that may be clipped without materialising their per-patient
            gradients (see :func:`per_sample_gradients`), e.g. :func:`linear_layers` of the model.
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
        ghost: Sequence[str] = (),
    ) -> None:
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.model = model
        self.ghost = tuple(ghost)
        for name in self.ghost:
            _check_ghost_module(model, name)
        self.max_grad_norm = float(max_grad_norm)
        self._last_norms = torch.zeros(0)
        self._shapes: dict[Any, dict[str, list[tuple[int, ...]]]] = {}
        # Opacus types expected_batch_size as int but only divides by it; keep the exact value.
        self.optimizer = _NoiseOnSums(
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

    def clipped_sums(self, grads: dict[str, Tensor | GhostFactors], batch_size: int,
                     params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        """Sum over patients of each parameter's rows, every patient clipped to L2
        ``max_grad_norm`` over all parameters together. Records the unclipped norms."""
        if batch_size == 0:
            self._last_norms = torch.zeros(0)
            return {n: torch.zeros_like(p) for n, p in params.items()}
        sq = torch.zeros(batch_size, dtype=torch.float64)
        for g in grads.values():
            part = (g.sq_norms() if isinstance(g, GhostFactors)
                    else torch.linalg.vector_norm(g.reshape(batch_size, -1), dim=1).square())
            sq += part.double()
        norms = sq.sqrt().float()
        self._last_norms = norms
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        sums = {}
        for name, p in params.items():
            g = grads[name]
            if isinstance(g, GhostFactors):
                sums[name] = g.weighted_sum(factor).to(p.dtype).view_as(p)
            else:
                sums[name] = torch.einsum("i,i...", factor, g).to(p.dtype)
        return sums

    def step(self, loss_fn: PerSampleLoss, inputs: Sequence[Any], batch_size: int) -> Tensor:
        """Compute per-patient gradients of ``loss_fn`` on ``inputs`` and take one noisy step.

        ``batch_size`` may be 0 (an empty Poisson sample): no forward runs, every parameter's
        clipped sum is zero and the step applies noise only. Returns the per-patient losses (B,).
        """
        params = self._trainable()
        managed = {id(p) for p in self.optimizer.params}
        missing = [n for n, p in params.items() if id(p) not in managed]
        if missing:
            raise ValueError(f"trainable parameters not in the optimizer: {missing[:5]}")
        if batch_size > 0:
            grads, losses = per_sample_gradients(self.model, loss_fn, inputs, params,
                                                 ghost=self.ghost, shape_cache=self._shapes)
        else:
            grads, losses = {}, torch.zeros(0)
        sums = self.clipped_sums(grads, batch_size, params)
        for p in self.optimizer.params:  # Opacus noises p.grad of every trainable parameter
            p.summed_grad = None
        for name, p in params.items():
            p.grad = sums[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses.detach()

    def per_sample_norms(self) -> Tensor:
        """Norms of the last step's per-patient rows before clipping (diagnostics)."""
        return self._last_norms
