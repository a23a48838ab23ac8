"""``ModelConfig``: every architecture choice of the MiT backbone and its DINO head, as data.

Loaded from YAML with :func:`fed_unimiss.config.load_yaml` (``fed_unimiss/models/presets/*.yaml``) or built by
:func:`fed_unimiss.models.create_model` from a preset name. The defaults are the UniMiSS reference
``small`` configuration (YtongXie/UniMiSS-code, ``models/MiT.py`` + ``models/MiT_encoder.py``);
``validate()`` runs the cross-field checks so a bad YAML file fails at load time, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the MiT encoder + U-like decoder + DINO projection head.

    Stage lists run from the finest encoder stage to the coarsest (encoder) and from the coarsest
    to the finest (decoder), as in the reference code.
    """

    # Name recorded in checkpoints; "custom" for hand-written configs.
    preset: str = "custom"
    # Input channels of the 2D path (grey X-ray repeated to 3) and of the 3D path (CT).
    in_chans_2d: int = 3
    in_chans_3d: int = 1
    # Channels of the k7 stem conv block; 32 in the reference.
    stem_dim: int = 32
    # Encoder stage widths; the first is also the CLS width and the backbone's output width.
    embed_dims: tuple[int, ...] = (48, 128, 256, 512)
    # Attention heads per encoder stage; each must divide its stage width.
    num_heads: tuple[int, ...] = (1, 2, 4, 8)
    # Transformer blocks per encoder stage: (2,3,4,3) is "small", (1,1,1,1) "tiny".
    depths: tuple[int, ...] = (2, 3, 4, 3)
    # Spatial-reduction ratio of keys/values per encoder stage (1 = no reduction conv).
    sr_ratios: tuple[int, ...] = (6, 4, 2, 1)
    # MLP hidden width = mlp_ratio x stage width, in encoder and decoder.
    mlp_ratio: float = 4.0
    # Bias on the q and kv projections of the encoder (the reference: on).
    qkv_bias: bool = True
    # LayerNorm eps of the encoder blocks (reference 1e-6; the sr LayerNorm keeps torch's 1e-5).
    norm_eps: float = 1e-6
    # Decoder stage widths, coarse to fine; stage i adds the encoder skip of width
    # embed_dims[-2 - i], so they must mirror embed_dims[:-1] reversed.
    decoder_dims: tuple[int, ...] = (256, 128, 48)
    decoder_heads: tuple[int, ...] = (8, 4, 2)
    # Decoder blocks per stage: (3,4,3) "small", (1,1,1) "tiny".
    decoder_depths: tuple[int, ...] = (3, 4, 3)
    decoder_sr_ratios: tuple[int, ...] = (2, 4, 6)
    # The reference decoder has no q/kv bias and default LayerNorm eps (1e-5).
    decoder_qkv_bias: bool = False
    decoder_norm_eps: float = 1e-5
    # Pretraining sizes the positional embeddings are stored for; any other size is resized at
    # run time (bicubic 2D, trilinear 3D), so change these only to match a new pretraining crop.
    img_size_2d: int = 224
    img_size_3d: tuple[int, int, int] = (16, 96, 96)
    # DINO head: Linear(in, hidden)-GELU-...-Linear(hidden, bottleneck), L2-norm, last layer.
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    # Prototypes; 65536 in the reference. Smaller is cheaper to send over the wire.
    head_out_dim: int = 65536
    head_nlayers: int = 3
    # True: weight-normalised last layer with g fixed at 1 (the reference). False: a plain
    # nn.Linear the trainer renormalises after each step, for Opacus (DP) runs.
    head_weight_norm: bool = True

    @property
    def out_dim(self) -> int:
        """Width of the backbone output (the decoder CLS token)."""
        return self.decoder_dims[-1]

    def validate(self) -> None:
        """Cross-field checks; raises ``ValueError`` naming the field and the fix."""
        n = len(self.embed_dims)
        if n < 2:
            raise ValueError(f"embed_dims: need at least 2 stages, got {list(self.embed_dims)}")
        for name in ("num_heads", "depths", "sr_ratios"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name}: expected {n} values (one per encoder stage in embed_dims), "
                    f"got {list(getattr(self, name))}"
                )
        for name in ("decoder_heads", "decoder_depths", "decoder_sr_ratios"):
            if len(getattr(self, name)) != len(self.decoder_dims):
                raise ValueError(
                    f"{name}: expected {len(self.decoder_dims)} values (one per decoder stage), "
                    f"got {list(getattr(self, name))}"
                )
        expected_dec = tuple(reversed(self.embed_dims[:-1]))
        if tuple(self.decoder_dims) != expected_dec:
            raise ValueError(
                f"decoder_dims: must mirror the encoder skips, i.e. {list(expected_dec)} for "
                f"embed_dims {list(self.embed_dims)}; got {list(self.decoder_dims)}"
            )
        for dims_name, heads_name in (
            ("embed_dims", "num_heads"),
            ("decoder_dims", "decoder_heads"),
        ):
            for i, (d, h) in enumerate(
                zip(getattr(self, dims_name), getattr(self, heads_name), strict=True)
            ):
                if h < 1 or d % h != 0:
                    raise ValueError(
                        f"{heads_name}[{i}]: {h} heads do not divide {dims_name}[{i}] = {d}"
                    )
        positive = {
            "in_chans_2d": [self.in_chans_2d],
            "in_chans_3d": [self.in_chans_3d],
            "stem_dim": [self.stem_dim],
            "embed_dims": self.embed_dims,
            "depths": self.depths,
            "sr_ratios": self.sr_ratios,
            "decoder_depths": self.decoder_depths,
            "decoder_sr_ratios": self.decoder_sr_ratios,
            "img_size_2d": [self.img_size_2d],
            "img_size_3d": self.img_size_3d,
            "head_hidden_dim": [self.head_hidden_dim],
            "head_bottleneck_dim": [self.head_bottleneck_dim],
            "head_out_dim": [self.head_out_dim],
            "head_nlayers": [self.head_nlayers],
        }
        for name, values in positive.items():
            if any(v < 1 for v in values):
                raise ValueError(f"{name}: every value must be >= 1, got {values!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: must be > 0, got {self.mlp_ratio}")
        for name in ("norm_eps", "decoder_norm_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
