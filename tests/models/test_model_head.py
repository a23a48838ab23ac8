"""DINO head: weight-norm and plain (DP) last layers, and real Opacus per-sample gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fed_unimiss.models import DINOHead, create_model
from fed_unimiss.models.head import WeightNormLinear


def test_weight_norm_head_matches_reference_layout():
    torch.manual_seed(0)
    head = DINOHead(48, 512, hidden_dim=64, bottleneck_dim=16)
    assert isinstance(head.last_layer, WeightNormLinear)
    assert set(dict(head.last_layer.named_parameters())) == {"weight_g", "weight_v"}
    assert not head.last_layer.weight_g.requires_grad  # g fixed at 1
    rows = head.last_layer.weight.norm(dim=1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    x = torch.randn(4, 48)
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(head(x), z @ head.last_layer.weight.T, atol=1e-6)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]


def _explicit_weight_norm(x, v, g):
    """The straightforward computation: build g * v / ||v|| row-wise, then a linear layer."""
    return x @ (g * v / v.norm(dim=1, keepdim=True)).T


@pytest.mark.parametrize("train_g", [False, True])
def test_weight_norm_linear_equals_explicit_normalised_weight(train_g):
    """The fused path (scale the outputs, never build the normalised matrix) gives the same
    outputs and gradients as building the weight, within float rounding."""
    torch.manual_seed(0)
    layer = WeightNormLinear(16, 300)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    layer.weight_g.requires_grad_(train_g)
    x = torch.randn(2, 3, 16, requires_grad=True)  # extra leading axis: any batch shape
    grad_out = torch.randn(2, 3, 300)
    out = layer(x)
    out.backward(grad_out)
    got = [out.detach(), x.grad, layer.weight_v.grad] + ([layer.weight_g.grad] if train_g else [])
    x2 = x.detach().clone().requires_grad_(True)
    v2 = layer.weight_v.detach().clone().requires_grad_(True)
    g2 = layer.weight_g.detach().clone().requires_grad_(train_g)
    expected_out = _explicit_weight_norm(x2, v2, g2)
    expected_out.backward(grad_out)
    expected = [expected_out.detach(), x2.grad, v2.grad] + ([g2.grad] if train_g else [])
    for a, b in zip(got, expected, strict=True):
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 1e-6, err


def test_weight_norm_linear_under_torch_func():
    """Per-sample gradients through the layer (vmap of grad) equal one-sample autograd."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = WeightNormLinear(8, 32)
    x = torch.randn(3, 8)
    params = {"weight_v": layer.weight_v.detach()}

    def loss(p, xi):
        return functional_call(layer, p, (xi[None],)).square().sum()

    rows = vmap(grad(loss), in_dims=(None, 0))(params, x)["weight_v"]
    for i in range(3):
        v = layer.weight_v.detach().clone().requires_grad_(True)
        _explicit_weight_norm(x[i : i + 1], v, layer.weight_g).square().sum().backward()
        assert torch.allclose(rows[i], v.grad, rtol=1e-5, atol=1e-6)


def test_plain_last_layer_for_dp_is_renormalised():
    torch.manual_seed(0)
    model = create_model("micro", head_weight_norm=False)
    last = model.head.last_layer
    assert type(last) is nn.Linear and last.bias is None
    assert tuple(last.weight.shape) == (1024, 64)
    assert not any(isinstance(m, WeightNormLinear) for m in model.modules())
    rows = last.weight.norm(dim=1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    with torch.no_grad():
        last.weight.mul_(torch.rand(1024, 1) + 0.5)
    model.head.renormalize_last_layer()
    rows = last.weight.norm(dim=1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_renormalize_is_a_no_op_with_weight_norm():
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=8)
    before = head.last_layer.weight_v.detach().clone()
    head.renormalize_last_layer()
    assert torch.equal(head.last_layer.weight_v, before)


def test_bad_nlayers():
    with pytest.raises(ValueError, match="nlayers must be >= 1, got 0"):
        DINOHead(8, 8, nlayers=0)


@pytest.mark.slow
def test_opacus_per_sample_gradients_equal_single_sample_gradients():
    """Real Opacus on the DP configuration: every trainable 2D/shared tensor gets a per-sample
    gradient, equal to the gradient of that sample run alone."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = create_model("micro", head_weight_norm=False, head_out_dim=64)
    x = torch.randn(2, 3, 64, 64)
    expected = []
    for i in range(2):
        model.zero_grad(set_to_none=True)
        model(x[i : i + 1]).sum().backward()
        expected.append(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        )
    model.zero_grad(set_to_none=True)
    gsm = GradSampleModule(model, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # full-backward-hook notice on the input
        gsm(x).sum().backward()
    checked = 0
    for name, p in model.named_parameters():
        if name not in expected[0]:
            assert getattr(p, "grad_sample", None) is None, name  # 3D tensors: untouched
            continue
        assert p.grad_sample is not None, name
        for i in range(2):
            # relative to the tensor's scale: a batch-of-2 conv backward sums in another order
            # than a batch of 1 (measured 1.2e-5 on one of 221,184 elements of a 0.19-max tensor)
            scale = float(expected[i][name].abs().max()) + 1e-12
            err = float((p.grad_sample[i] - expected[i][name]).abs().max()) / scale
            assert err < 1e-4, (name, i, err)
        checked += 1
    assert checked == len(expected[0])
    gsm._close()
