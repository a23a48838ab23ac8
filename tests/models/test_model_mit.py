"""MiT shapes in 2D and 3D, positional-embedding resizing, input errors, attention, determinism,
state-dict round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fed_unimiss.checkpoint import load_checkpoint, save_checkpoint
from fed_unimiss.config import from_dict, to_dict
from fed_unimiss.models import ModelConfig, create_model, encoder_grids
from fed_unimiss.models.mit import Attention, PosEmbed

SIZES = [(224, 224), (96, 96), (192, 160), (16, 96, 96), (24, 128, 128), (32, 64, 64)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _expected_grids(size: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Stride 4, 8, 16, 32 in-plane; the 3D depth is strided 2, 4, 8, 16 (stem keeps depth)."""
    grids = []
    for i in range(4):
        r = 2 ** (i + 2)
        if len(size) == 2:
            grids.append((_ceil_div(size[0], r), _ceil_div(size[1], r)))
        else:
            grids.append((_ceil_div(size[0], r // 2), _ceil_div(size[1], r), _ceil_div(size[2], r)))
    return grids


def test_reference_token_grids():
    cfg = create_model("micro").config
    assert encoder_grids(cfg, 2, (224, 224)) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert encoder_grids(cfg, 3, (16, 96, 96)) == [(8, 24, 24), (4, 12, 12), (2, 6, 6), (1, 3, 3)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_output_shapes(micro, size):
    chans = 3 if len(size) == 2 else 1
    x = torch.randn(1, chans, *size)
    cfg = micro.config
    with torch.no_grad():
        feats = micro.backbone.forward_intermediates(x)
        logits = micro(x)
    grids = _expected_grids(size)
    assert [tuple(m.shape) for m in feats.encoder_maps] == [
        (1, d, *g) for d, g in zip(cfg.embed_dims, grids, strict=True)
    ]
    assert [tuple(c.shape) for c in feats.encoder_cls] == [(1, d) for d in cfg.embed_dims]
    assert [tuple(m.shape) for m in feats.decoder_maps] == [
        (1, d, *g) for d, g in zip(cfg.decoder_dims, reversed(grids[:-1]), strict=True)
    ]
    assert feats.decoder_cls.shape == (1, cfg.decoder_dims[-1])
    assert logits.shape == (1, cfg.head_out_dim)
    # the backbone output is the decoder CLS, and the head maps it to the logits; forward()
    # computes the last block for the CLS row alone (a one-row matmul rounds differently)
    with torch.no_grad():
        assert torch.allclose(micro.backbone(x), feats.decoder_cls, atol=1e-5)
        assert torch.allclose(micro.head(feats.decoder_cls), logits, atol=1e-5)
        enc = micro.backbone.forward_features(x)
    assert all(torch.allclose(a, b) for a, b in zip(enc, feats.encoder_maps, strict=True))


def test_reference_presets_keep_reference_shapes():
    torch.manual_seed(0)
    model = create_model("tiny", head_out_dim=16, head_hidden_dim=16)
    with torch.no_grad():
        f2 = model.backbone.forward_intermediates(torch.randn(1, 3, 224, 224))
        f3 = model.backbone.forward_intermediates(torch.randn(1, 1, 16, 96, 96))
    assert [tuple(m.shape[1:]) for m in f2.encoder_maps] == [
        (48, 56, 56),
        (128, 28, 28),
        (256, 14, 14),
        (512, 7, 7),
    ]
    assert [tuple(m.shape[1:]) for m in f3.encoder_maps] == [
        (48, 8, 24, 24),
        (128, 4, 12, 12),
        (256, 2, 6, 6),
        (512, 1, 3, 3),
    ]
    assert tuple(f3.decoder_maps[-1].shape) == (1, 48, 8, 24, 24)
    assert tuple(f2.decoder_cls.shape) == (1, 48)


@pytest.mark.parametrize("size", [(100, 72), (9, 50, 50), (8, 64, 64), (1, 64, 64)])
def test_sizes_that_do_not_divide(micro, size):
    chans = 3 if len(size) == 2 else 1
    with torch.no_grad():
        feats = micro.backbone.forward_intermediates(torch.randn(1, chans, *size))
    grids = _expected_grids(size)
    assert [tuple(m.shape[2:]) for m in feats.encoder_maps] == grids
    assert tuple(feats.decoder_maps[-1].shape[2:]) == grids[0]
    assert torch.isfinite(feats.decoder_cls).all()


def test_feature_info_matches_the_maps(micro):
    x2, x3 = torch.randn(1, 3, 64, 96), torch.randn(1, 1, 16, 64, 96)
    with torch.no_grad():
        f2 = micro.backbone.forward_intermediates(x2)
        f3 = micro.backbone.forward_intermediates(x3)
    info = micro.backbone.feature_info
    assert len(info) == len(f2.encoder_maps) + len(f2.decoder_maps)
    for entry, m2, m3 in zip(
        info, f2.encoder_maps + f2.decoder_maps, f3.encoder_maps + f3.decoder_maps, strict=True
    ):
        assert m2.shape[1] == m3.shape[1] == entry["num_chs"]
        assert tuple(m2.shape[2:]) == (64 // entry["reduction"], 96 // entry["reduction"])
        assert tuple(m3.shape[2:]) == tuple(
            s // r for s, r in zip((16, 64, 96), entry["reduction_3d"], strict=True)
        )


@pytest.mark.parametrize(
    "shape, message",
    [
        (
            (3, 64, 64),
            r"must be \(B, 3, H, W\) for 2D or \(B, 1, D, H, W\) for 3D; got shape \(3, 64, 64\)",
        ),
        ((1, 1, 64, 64), r"2D input \(B, C, H, W\) must have C = 3 channels.*repeat grey X-rays"),
        ((1, 3, 8, 64, 64), r"3D input \(B, C, D, H, W\) must have C = 1 channels"),
        ((1, 3, 32, 32), r"spatial size \(32, 32\) is too small.*\(1, 1\) grid"),
        ((1, 1, 16, 32, 32), r"spatial size \(16, 32, 32\) is too small"),
    ],
)
def test_bad_input_is_a_clear_value_error(micro, shape, message):
    with pytest.raises(ValueError, match=message):
        micro(torch.zeros(shape))


def test_integer_input_is_a_type_error(micro):
    with pytest.raises(TypeError, match="floating-point tensor, got torch.uint8"):
        micro(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_pos_embed_identity_at_the_stored_grid():
    pe = PosEmbed(8, (2, 6, 6))
    assert pe.resized((2, 6, 6)) is pe.weight


@pytest.mark.parametrize(
    "stored, target",
    [
        ((8, 24, 24), (12, 32, 28)),
        ((8, 24, 24), (3, 24, 24)),
        ((1, 3, 3), (4, 5, 6)),
        ((56, 56), (48, 40)),
        ((7, 7), (3, 3)),
    ],
)
def test_pos_embed_resize_keeps_each_axis_separate(stored, target):
    """Channel k holds the k-th coordinate; after resizing, channel k may vary along axis k only,
    monotonically, and the CLS slot is untouched. Catches axis mix-ups in the flatten order and
    the reference's depth limitation (it reshaped with the *target* depth)."""
    ndim = len(stored)
    pe = PosEmbed(ndim, stored)
    with torch.no_grad():
        coords = torch.meshgrid(
            *[torch.arange(s, dtype=torch.float32) for s in stored], indexing="ij"
        )
        pe.weight[0, 1:] = torch.stack([c.flatten() for c in coords], dim=1)
        pe.weight[0, 0] = -7.0
        out = pe.resized(target)
    assert out.shape == (1, 1 + torch.Size(target).numel(), ndim)
    assert torch.equal(out[0, 0], torch.full((ndim,), -7.0))
    fmap = out[0, 1:].T.reshape(ndim, *target)
    for k in range(ndim):
        for other in range(ndim):
            if other != k and target[other] > 1:
                assert torch.allclose(fmap[k].diff(dim=other), torch.zeros(()), atol=1e-4)
        if target[k] > 1 and stored[k] > 1:
            assert (fmap[k].diff(dim=k) > 0).all()


def test_pos_embed_forward_adds_positions_to_patches():
    pe = PosEmbed(4, (3, 3))
    fmap = torch.randn(2, 4, 3, 3)
    tokens = pe(fmap)
    assert tokens.shape == (2, 10, 4)
    assert torch.allclose(tokens[:, 1:], fmap.flatten(2).transpose(1, 2) + pe.weight[:, 1:])
    assert torch.allclose(tokens[:, 0], pe.weight[:, 0].expand(2, -1))


@pytest.mark.parametrize("sr, grid", [(1, (4, 4)), (2, (4, 6)), (2, (1, 4, 4)), (4, (4, 8, 8))])
def test_attention_equals_explicit_softmax(sr, grid):
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2, qkv_bias=True, sr_ratio=sr)
    n = torch.Size(grid).numel()
    x = torch.randn(2, 1 + n, 8)
    b, _, c = x.shape
    q = attn.q(x).reshape(b, -1, 2, 4).transpose(1, 2)
    if sr > 1:
        fmap = x[:, 1:].transpose(1, 2).reshape(b, c, *grid)
        pad = [0, 0] * (len(grid))
        for axis, g in enumerate(grid):  # replicate-pad axes shorter than the kernel
            pad[2 * (len(grid) - 1 - axis) + 1] = max(sr - g, 0)
        fmap = F.pad(fmap, pad, mode="replicate")
        conv = attn.sr_2d if len(grid) == 2 else attn.sr_3d
        reduced = conv(fmap).flatten(2).transpose(1, 2)
        kv_in = attn.norm(torch.cat([x[:, :1], reduced], dim=1))
    else:
        kv_in = x
    kv = attn.kv(kv_in).reshape(b, -1, 2, 2, 4).permute(2, 0, 3, 1, 4)
    weights = (q @ kv[0].transpose(-2, -1) * 4**-0.5).softmax(-1)
    expected = attn.proj((weights @ kv[1]).transpose(1, 2).reshape(b, -1, c))
    assert torch.allclose(attn(x, grid), expected, atol=1e-5)


@pytest.mark.parametrize(
    "sr, grid",
    [(6, (8, 24, 24)), (4, (4, 12, 12)), (2, (2, 6, 6)), (3, (7, 8, 10)), (6, (56, 56)), (3, (7, 11))],
)
def test_spatial_reduction_equals_the_unpadded_conv(sr, grid):
    """The reduction (a block matmul in 3D) is the sr conv on the token map, floored like the
    conv, in values and in gradients w.r.t. the tokens and the conv's weight and bias."""
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2, qkv_bias=True, sr_ratio=sr)
    conv = attn.sr_2d if len(grid) == 2 else attn.sr_3d
    n = torch.Size(grid).numel()
    x = torch.randn(2, n, 8, requires_grad=True)
    got = attn._reduce(x, grid)
    grad_out = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (x, conv.weight, conv.bias), grad_out)
    fmap = x.transpose(1, 2).reshape(2, 8, *grid)
    conv_fn = F.conv2d if len(grid) == 2 else F.conv3d
    expected = conv_fn(fmap, conv.weight, conv.bias, stride=sr).flatten(2).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad_out)
    assert got.shape == expected.shape == (2, math.prod(g // sr for g in grid), 8)
    for a, b in zip((got, *got_grads), (expected, *expected_grads), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), float((a - b).abs().max())


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (2, 1, 8, 64, 64)])
def test_forward_computes_only_the_cls_row_exactly(micro, shape):
    """forward() runs the decoder's last block for the CLS row alone; that equals the CLS of the
    full computation (forward_intermediates), in value and in every parameter's gradient."""
    torch.manual_seed(1)
    x = torch.randn(*shape)
    mit = micro.backbone
    out = mit(x)
    grads = torch.autograd.grad(out.square().sum(), [p for p in mit.parameters()], allow_unused=True)
    full = mit.forward_intermediates(x).decoder_cls
    full_grads = torch.autograd.grad(
        full.square().sum(), [p for p in mit.parameters()], allow_unused=True
    )
    assert torch.allclose(out, full, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(mit.named_parameters(), grads, full_grads, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            scale = float(b.abs().max()) + 1e-12
            assert float((a - b).abs().max()) / scale < 1e-4, name


def test_deterministic_under_a_seed():
    x = torch.randn(1, 1, 8, 64, 64)
    torch.manual_seed(123)
    a = create_model("micro")
    torch.manual_seed(123)
    b = create_model("micro")
    torch.manual_seed(124)
    c = create_model("micro")
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a(x), a(x))


def test_state_dict_round_trip_through_a_checkpoint(tmp_path, micro):
    x2, x3 = torch.randn(2, 3, 64, 64), torch.randn(1, 1, 8, 64, 64)
    path = save_checkpoint(tmp_path, "model", micro.state_dict(), {"model": to_dict(micro.config)})
    tensors, meta = load_checkpoint(path)
    assert set(tensors) == set(micro.state_dict())
    torch.manual_seed(99)
    fresh = create_model(from_dict(ModelConfig, meta["model"]))
    fresh.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x2), micro(x2))
        assert torch.equal(fresh(x3), micro(x3))


def test_reference_initialisation(micro):
    enc = micro.backbone.encoder
    lin = enc.stages[0][0].mlp.fc1
    assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert (
        0.017 < lin.weight.std().item() < 0.023
    )  # trunc-normal std 0.02 (cut at +-2, as DINO/timm)
    conv = enc.patch_embed_3d[1].conv  # Kaiming fan-out: std = sqrt(2 / (out * k^3))
    expected = (2 / (conv.out_channels * 27)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
    norm = enc.patch_embed_2d[0].norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
