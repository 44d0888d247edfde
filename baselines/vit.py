"""ViT / DeiT (Dosovitskiy et al. 2021, Touvron et al. 2021) on the same inputs as BiXT.

Class token, learned positional embedding, pre-norm blocks (BiXT's latent block is exactly a ViT block), attention
through `bixt.nn.attention` so the backends are BiXT's. The positional embedding is resized bicubically to the input's
token grid (as timm's `resample_abs_pos_embed`), so one model runs at any image size: `vit_ti_p16` takes 16,384
tokens. Points and sequences use BiXT's tokenizers unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bixt.models.base import Model
from bixt.models.blocks import LatentBlock
from bixt.models.config import ModelConfig
from bixt.models.registry import register_family
from bixt.nn.layers import check_padding_mask, classifier, drop_path_rates, layer_norm
from bixt.nn.linear import Linear
from bixt.nn.tokenizers import ImageTokenizer, build_tokenizer


@dataclass(frozen=True)
class ViTConfig(ModelConfig):
    """Everything that defines a ViT: ModelConfig's input and body fields (the input named and meant as BiXT's, so
    both are handed the same tensors; images: img_size is the grid the positional table is learned on, other sizes
    resize it). The defaults are DeiT-Ti/16 for 224 px ImageNet."""

    heads: int = 3
    depth: int = 12
    # dense_classes > 0 (ModelConfig): a per-token head on the patch tokens.

    _POSITIVE: ClassVar[tuple[str, ...]] = ("dim", "depth", "heads", "mlp_ratio")


def resample_pos_embed(pos: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """(1, old_h * old_w, D) -> (1, new_h * new_w, D): bicubic with antialiasing in float32, as timm does."""
    if tuple(old) == tuple(new):
        return pos
    grid = pos.reshape(1, *old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).to(pos.dtype)


class LearnedPosEmbed2d(nn.Module):
    """A learned (1, h * w, D) table for the default grid, resized for any other grid."""

    def __init__(self, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.weight = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))

    def forward(self, h: int, w: int) -> Tensor:
        return resample_pos_embed(self.weight, self.grid, (h, w))[0]


class ViTImageTokenizer(ImageTokenizer):
    """BiXT's conv patch embedding with ViT's learned positional embedding in place of the Fourier features."""

    def __init__(self, dim: int, in_chans: int = 3, patch_size: int = 16, stride: int = 16, img_size: int = 224):
        super().__init__(dim, in_chans, patch_size, stride, img_size, pos_buffer=False)
        side = img_size // stride
        self.pos_embed = LearnedPosEmbed2d(dim, (side, side))


def build_vit_tokenizer(cfg: ViTConfig) -> nn.Module:
    if cfg.modality == "image":
        return ViTImageTokenizer(cfg.dim, cfg.in_chans, cfg.patch_size, cfg.stride, cfg.img_size)
    return build_tokenizer(cfg, cfg.dim)


class ViT(Model):
    """Vision Transformer: a class token and all input tokens in one self-attention stack.

    model(x) -> logits (B, num_classes) from the class token; forward_features(x) -> all tokens after the final norm
    (B, 1 + N, dim), class token first; forward_dense(x) -> (B, N, dense_classes) from the input tokens.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__(cfg)
        self.tokenizer = build_vit_tokenizer(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, cfg.dim))  # the class token's slot of timm's pos_embed
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(LatentBlock(cfg, rate) for rate in drop_path_rates(cfg.drop_path_rate, cfg.depth))
        self.norm = layer_norm(cfg.dim)
        self.head = classifier(cfg.dim, cfg.num_classes)
        if cfg.dense_classes:
            self.dense_head = Linear(cfg.dim, cfg.dense_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ViT init: truncated-normal 0.02 for Linear weights and positions, zero biases, tiny class token."""
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)
        if isinstance(self.tokenizer, ViTImageTokenizer):
            nn.init.trunc_normal_(self.tokenizer.pos_embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        tok = self.tokenizer(x)
        check_padding_mask(padding_mask, tok.shape[:2])  # the class token is never padding
        cls = (self.cls_token + self.cls_pos).expand(tok.shape[0], -1, -1)
        x = self.pos_drop(torch.cat((cls, tok), dim=1))
        if padding_mask is not None:  # the class token is never padding
            padding_mask = F.pad(padding_mask, (1, 0), value=False)
        for block in self.blocks:
            x = self.run_layer(block, x, padding_mask)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x[:, 0] if pre_logits else self.head(x[:, 0])

    def token_features(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.forward_features(x, padding_mask)[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# timm's layout (DeiT's released checkpoints among them): the ViT family's checkpoint filter.


def is_timm_vit_layout(state: Mapping[str, Tensor]) -> bool:
    """timm's VisionTransformer keys (DeiT's released checkpoints among them)."""
    return {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= state.keys()


def checkpoint_filter_fn(state: dict[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """timm's class-token ViT (e.g. deit_tiny_patch16_224) -> this ViT, when the keys are timm's (else unchanged):
    the position table is split into the class token's entry and the patch grid's, the patch embedding moves under
    the tokenizer; blocks, norm and head keep their names (the same fused qkv layout: parts, heads, head_dim)."""
    if not is_timm_vit_layout(state):
        return state
    other = [k for k in ("dist_token", "reg_token", "head_dist.weight", "fc_norm.weight") if k in state]
    if other:
        raise ValueError(f"this timm ViT has {', '.join(other)}: only the plain class-token ViT maps onto vit_* "
                         "(e.g. deit_tiny_patch16_224, not the distilled or register variants)")
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            out["cls_pos"], out["tokenizer.pos_embed.weight"] = value[:, :1], value[:, 1:]
        elif key.startswith("patch_embed.proj."):
            out["tokenizer.proj." + key.rsplit(".", 1)[1]] = value
        else:
            out[key] = value
    return out


# Named configs: overrides of the DeiT-Ti/16 defaults. DeiT-Ti and DeiT-S parameter counts are the published ones
# (5,717,416 and 22,050,664) and are tested. The points and text rows mirror BiXT's.
VIT_TABLE: dict[str, dict] = {
    "vit_ti_p16": {},
    "vit_s_p16": {"dim": 384, "heads": 6},
    "vit_ti_points": {"modality": "points", "in_chans": 3, "seq_len": 1024, "num_classes": 40},
    "vit_ti_text": {"modality": "sequence", "in_chans": 0, "vocab_size": 256, "seq_len": 4096, "num_classes": 2},
    # bixt_cpu's sizes (the training comparison's matched set): the same 49 patches, all attending to each other.
    "vit_cpu": {"img_size": 28, "in_chans": 1, "patch_size": 8, "stride": 4, "dim": 64, "depth": 4, "heads": 2,
                "num_classes": 10},
    # ... and bixt_shapes' (point clouds): every point attends to every other.
    "vit_shapes": {"modality": "points", "in_chans": 3, "seq_len": 1024, "dim": 64, "depth": 4, "heads": 2,
                   "num_classes": 10},
}
CONFIGS: dict[str, ViTConfig] = {name: ViTConfig(**row) for name, row in VIT_TABLE.items()}
register_family("vit", CONFIGS, ViT, checkpoint_filter=checkpoint_filter_fn)
