"""BiXT's configuration: one dataclass, and the tables of named configs the "bixt" and "bixt-ablation" families
register (bixt/models/bixt.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bixt.models.config import ModelConfig
from bixt.nn.tokenizers import IMAGE_TOKENIZERS, check_conv_geometry

# How latents and tokens exchange information in each layer (the paper's Table 1): one shared similarity matrix
# (BiXT), two one-way cross-attentions one after the other, or latents re-reading the embedded tokens (Perceiver-like,
# the tokens are never refined).
CROSS_ATTENTION = ("bidirectional", "sequential", "iterative")


@dataclass(frozen=True)
class BiXTConfig(ModelConfig):
    """Everything that defines a BiXT. The defaults are BiXT-Ti/16 for 224 px ImageNet."""

    pos_buffer: bool = True  # keep the img_size grid's Fourier features as a buffer (authors' fixed variants)
    tokenizer: str = "patch"  # images: patch (one strided conv) | conv (the authors' 3x3 conv stem, stride=patch_size)
    num_latents: int = 64
    token_dim: int | None = None  # the token stream's width; None: dim (the latents')
    attn_dim: int | None = None  # inner width of the cross-attention; None: dim
    depth: int = 12
    cross_heads: int | None = None  # cross-attention heads; None: heads
    cross_attention: str = "bidirectional"  # bidirectional | sequential | iterative: ablations, see CROSS_ATTENTION
    # dense_classes > 0 (ModelConfig): a per-token head on the token stream, and the last layer stays two-sided.

    _POSITIVE: ClassVar[tuple[str, ...]] = ("num_latents", "dim", "depth", "heads", "mlp_ratio", "token_dim",
                                            "attn_dim", "cross_heads")
    _DEFAULT_FROM: ClassVar[dict[str, str]] = {"token_dim": "dim", "attn_dim": "dim", "cross_heads": "heads"}

    def __post_init__(self):
        super().__post_init__()
        if self.attn_dim % self.cross_heads:
            raise ValueError(f"attention dim {self.attn_dim} is not divisible by cross_heads={self.cross_heads}:"
                             " choose cross_heads that divide it")
        if self.cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"unknown cross_attention {self.cross_attention!r}: choose one of "
                             f"{', '.join(CROSS_ATTENTION)}")
        if self.tokenizer not in IMAGE_TOKENIZERS:
            raise ValueError(f"unknown tokenizer {self.tokenizer!r}: choose one of {', '.join(IMAGE_TOKENIZERS)}")
        if self.tokenizer == "conv":
            if self.modality != "image":
                raise ValueError(f"tokenizer='conv' is an image tokenizer, the model's modality is {self.modality!r}")
            check_conv_geometry(self.patch_size, self.stride, self.img_size, self.token_dim)

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
_CONV = {"tokenizer": "conv"}
CPU_MATCHED = {"img_size": 28, "in_chans": 1, "patch_size": 8, "stride": 4, "num_latents": 16, "dim": 64, "depth": 4,
               "heads": 2, "num_classes": 10}
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
    # The authors' convolutional tokenizer (`BiXTConvTok`): a 3x3 stride-2 conv + BatchNorm stem instead of one
    # patch conv, otherwise the same model (their latinit is our init; their norm_lat is off with fc_norm).
    "bixt_ti_cnv_l64_p16": {**_CONV},
    "bixt_ti_cnv_l64_d13_p16": {**_CONV, "depth": 13},
    "bixt_ti_cnv_l64_d13_p8": {**_CONV, "depth": 13, "patch_size": 8, "stride": 8},
    "bixt_ti_cnv_l64_d13_p4": {**_CONV, "depth": 13, "patch_size": 4, "stride": 4},
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
    # The matched CPU-sized set of the training comparison (`bixt compare --data`): 28 px single-channel images
    # (Fashion-MNIST) as 49 overlapping 8x8 patches every 4 pixels, width 64, 4 layers of 2 heads, 16 latents.
    # bixt_cpu_sequential / _iterative (family bixt-ablation), perceiver_cpu and vit_cpu share every one of these.
    "bixt_cpu": {**CPU_MATCHED},
}
CONFIGS: dict[str, BiXTConfig] = {name: BiXTConfig(**row) for name, row in MODEL_TABLE.items()}

# BiXT-Ti/16 with the other attention patterns of the paper's Table 1 (family "bixt-ablation"). Sequential: per layer
# the latents read the tokens (then their MLP), then the tokens read those updated latents. Iterative: every layer is
# the one-sided cross-attention of BiXT's last layer, so the latents re-read the embedded tokens, no weight sharing
# (a weight-shared Perceiver at the same budget is `perceiver_ti`).
ABLATION_TABLE: dict[str, dict] = {
    "bixt_ti_sequential": {"cross_attention": "sequential"},
    "bixt_ti_iterative": {"cross_attention": "iterative"},
    "bixt_cpu_sequential": {**CPU_MATCHED, "cross_attention": "sequential"},
    "bixt_cpu_iterative": {**CPU_MATCHED, "cross_attention": "iterative"},
    "bixt_shapes_sequential": {**MODEL_TABLE["bixt_shapes"], "cross_attention": "sequential"},
    "bixt_shapes_iterative": {**MODEL_TABLE["bixt_shapes"], "cross_attention": "iterative"},
}
ABLATION_CONFIGS: dict[str, BiXTConfig] = {name: BiXTConfig(**row) for name, row in ABLATION_TABLE.items()}
