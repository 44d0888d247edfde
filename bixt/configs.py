"""BiXT configurations: one dataclass, one table of named configs."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from bixt.attention import check_backend
from bixt.tokenizers import MODALITIES

# How latents and tokens exchange information in each layer (the paper's Table 1): one shared similarity matrix
# (BiXT), two one-way cross-attentions one after the other, or latents re-reading the embedded tokens (Perceiver-like,
# the tokens are never refined).
CROSS_ATTENTION = ("bidirectional", "sequential", "iterative")


@dataclass(frozen=True)
class ModelConfig:
    """What every model config shares (BiXT's, ViT's, the Perceiver's): the input fields, named alike so that every
    model is handed the same tensors, the common body fields and their checks, and the `bixt models` summary."""

    # Input: which tokenizer, and the default input it is sized for.
    modality: str = "image"  # image | points | sequence
    in_chans: int = 3  # image channels; channels per point (xyz first); features per sequence token (0: ids)
    img_size: int = 224  # images: the default side; any multiple of the stride runs
    patch_size: int = 16
    stride: int = 16  # 16, 8, 4: the authors' /16, /8 and /4 tokenizers (overlapping 16 px patches)
    seq_len: int = 1024  # points / sequences: the default number of tokens
    vocab_size: int = 0  # sequences of integer ids
    fourier_bands: int = 16  # points: Fourier bands per coordinate
    max_freq: float = 32.0
    # Body.
    dim: int = 192
    heads: int = 6  # self-attention heads
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # bias of the fused qkv (and BiXT's r/v) projections
    layerscale: float | None = None  # LayerScale init value; None disables it
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear in depth from 0 to this
    attn_backend: str = "auto"
    num_classes: int = 1000  # 0: no classification head

    _POSITIVE: ClassVar[tuple[str, ...]] = ("dim", "heads", "mlp_ratio")

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}: choose one of {', '.join(MODALITIES)}")
        for name in self._POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads={self.heads}: choose heads that divide it "
                             f"(e.g. {self.dim // 32 or 1} for head dim 32)")
        if self.num_classes < 0 or getattr(self, "dense_classes", 0) < 0:
            raise ValueError("num_classes and dense_classes must be >= 0")
        check_backend(self.attn_backend)

    @property
    def default_tokens(self) -> int:
        return (self.img_size // self.stride) ** 2 if self.modality == "image" else self.seq_len

    def summary(self) -> dict:
        """The columns of `bixt models` (each config has a `depth`, as a field or a property)."""
        return {"modality": self.modality, "latents": getattr(self, "num_latents", "-"), "dim": self.dim,
                "depth": self.depth, "heads": self.heads, "tokens": self.default_tokens}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BiXTConfig(ModelConfig):
    """Everything that defines a BiXT. The defaults are BiXT-Ti/16 for 224 px ImageNet."""

    pos_buffer: bool = True  # keep the img_size grid's Fourier features as a buffer (authors' fixed variants)
    num_latents: int = 64
    token_dim: int | None = None  # defaults to dim (the latents' dim)
    attn_dim: int | None = None  # inner dim of the cross-attention; defaults to dim
    depth: int = 12
    cross_heads: int | None = None  # defaults to heads
    cross_attention: str = "bidirectional"  # bidirectional | sequential | iterative: ablations, see CROSS_ATTENTION
    dense_classes: int = 0  # > 0: per-token head on the token stream, and the last layer stays two-sided

    _POSITIVE: ClassVar[tuple[str, ...]] = ("num_latents", "dim", "depth", "heads", "mlp_ratio")

    def __post_init__(self):
        super().__post_init__()
        if self.cross_attn_dim % self.ca_heads:
            raise ValueError(f"attention dim {self.cross_attn_dim} is not divisible by cross_heads={self.ca_heads}:"
                             " choose cross_heads that divide it")
        if self.cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"unknown cross_attention {self.cross_attention!r}: choose one of "
                             f"{', '.join(CROSS_ATTENTION)}")

    @property
    def tok_dim(self) -> int:
        return self.token_dim or self.dim

    @property
    def cross_attn_dim(self) -> int:
        return self.attn_dim or self.dim

    @property
    def ca_heads(self) -> int:
        return self.cross_heads or self.heads

    @property
    def two_sided_last(self) -> bool:
        """Dense models keep refining the tokens in the last layer; classifiers need only the latents there."""
        return self.dense_classes > 0 and self.refines_tokens

    @property
    def refines_tokens(self) -> bool:
        """Iterative attention never updates the tokens: every layer is one-sided."""
        return self.cross_attention != "iterative"


# Named configs: overrides of the BiXT-Ti/16 defaults. Parameter counts and GMACs of the image models are the
# authors' (BIXT-FACTS.md section 2) and are tested. `_ft384`: fine-tuned at 384 px with the positional
# encoding recomputed per input (no stored grid). `d13`: one more layer, for dense fine-tuning.
_FT384 = {"img_size": 384, "pos_buffer": False}
_ED256 = {"dim": 256, "heads": 8}
MODEL_TABLE: dict[str, dict] = {
    "bixt_ti_l64_p16": {},
    "bixt_ti_l64_p16s8": {"stride": 8},
    "bixt_ti_l64_p16s4": {"stride": 4},
    "bixt_ti_l64_p16_ft384": {**_FT384},
    "bixt_ti_l64_p16s8_ft384": {"stride": 8, **_FT384},
    "bixt_ti_l64_p16s4_ft384": {"stride": 4, **_FT384},
    "bixt_ti_l32_p16": {"num_latents": 32},
    "bixt_ti_l32_p16s8": {"num_latents": 32, "stride": 8},
    "bixt_ti_l128_p16": {"num_latents": 128},
    "bixt_ti_l128_p16s8": {"num_latents": 128, "stride": 8},
    "bixt_ti_l64_d13_p16": {"depth": 13},
    "bixt_ti_l64_d13_p16s8": {"depth": 13, "stride": 8},
    "bixt_ti_l64_d13_p16s4": {"depth": 13, "stride": 4},
    "bixt_ti_l64_d13_p16_ft384": {"depth": 13, **_FT384},
    "bixt_ti_l64_d13_p16s8_ft384": {"depth": 13, "stride": 8, **_FT384},
    "bixt_ed256_l64_p16": {**_ED256},
    "bixt_ed256_l64_p16s8": {**_ED256, "stride": 8},
    "bixt_ed256_l64_p16s8_ft384": {**_ED256, "stride": 8, **_FT384},
    "bixt_ed256LS_l64_p16s8": {**_ED256, "stride": 8, "layerscale": 1e-5},
    "bixt_ed256LS_l64_p16s8_ft384": {**_ED256, "stride": 8, "layerscale": 1e-5, **_FT384},
    # Other modalities, same Ti body: ModelNet40-style point clouds and byte-level text (LRA-style).
    "bixt_ti_l64_points": {"modality": "points", "in_chans": 3, "seq_len": 1024, "num_classes": 40},
    "bixt_ti_l64_text": {"modality": "sequence", "in_chans": 0, "vocab_size": 256, "seq_len": 4096,
                         "num_classes": 2},
    # CPU-sized models for `bixt train`'s built-in data (0.5 M params): 8x8 grayscale digits as 16 overlapping
    # 4x4 patches (stride 2, as the authors' /8 tokenizer overlaps), and the procedural point-cloud shapes.
    "bixt_digits": {"img_size": 8, "in_chans": 1, "patch_size": 4, "stride": 2, "num_latents": 16, "dim": 64,
                    "depth": 4, "heads": 2, "num_classes": 10},
    "bixt_shapes": {"modality": "points", "in_chans": 3, "seq_len": 1024, "num_latents": 32, "dim": 64,
                    "depth": 4, "heads": 2, "num_classes": 10},
    # ... and byte sequences (`listops`, `textfolder:PATH`): ids 0-255, 512 bytes by default.
    "bixt_bytes": {"modality": "sequence", "in_chans": 0, "vocab_size": 256, "seq_len": 512, "num_latents": 32,
                   "dim": 64, "depth": 4, "heads": 2, "num_classes": 10},
}
CONFIGS: dict[str, BiXTConfig] = {name: BiXTConfig(**row) for name, row in MODEL_TABLE.items()}

# BiXT-Ti/16 with the other attention patterns of the paper's Table 1 (family "bixt-ablation"). Sequential: per layer
# the latents read the tokens (then their MLP), then the tokens read those updated latents. Iterative: every layer is
# the one-sided cross-attention of BiXT's last layer, so the latents re-read the embedded tokens, no weight sharing
# (a weight-shared Perceiver at the same budget is `perceiver_ti`).
ABLATION_TABLE: dict[str, dict] = {
    "bixt_ti_sequential": {"cross_attention": "sequential"},
    "bixt_ti_iterative": {"cross_attention": "iterative"},
}
ABLATION_CONFIGS: dict[str, BiXTConfig] = {name: BiXTConfig(**row) for name, row in ABLATION_TABLE.items()}
