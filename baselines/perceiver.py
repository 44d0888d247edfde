"""Perceiver (Jaegle et al. 2021) on the same inputs as BiXT.

A latent array reads the input by cross-attention, then a latent self-attention stack refines it; the read repeats
("iterative attention"), with the cross-attend weights shared after the first and, in the paper's ImageNet model,
one latent stack shared by every repeat. The tokens are never updated: there is no token stream to give per-token
outputs, which is the bottleneck BiXT removes.

Built from BiXT's own parts: a cross-attend is BiXT's one-sided cross block (latents: norm, attention on the normed
tokens, residual, MLP), a latent layer is BiXT's latent block, and weights and backends are handled as in BiXT, so
a comparison differs in the attention pattern only. Images are read as the paper reads them: raw pixels (or raw
patches) with Fourier features of their position concatenated; points and sequences use BiXT's tokenizers.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bixt.models.base import LatentModel, jax_init_
from bixt.models.blocks import CrossBlock, LatentBlock
from bixt.models.config import ModelConfig
from bixt.models.registry import register_family
from bixt.nn.layers import check_padding_mask, drop_path_rates, layer_norm
from bixt.nn.linear import Linear
from bixt.nn.posenc import fourier_features
from bixt.nn.tokenizers import ImageTokenizer, build_tokenizer, check_image, check_patch_geometry


@dataclass(frozen=True)
class PerceiverConfig(ModelConfig):
    """Everything that defines a Perceiver: ModelConfig's input and body fields plus the latent array and the
    repeat schedule. The defaults are the paper's ImageNet model (224 px, raw pixels)."""

    patch_size: int = 1  # 1: pixels, as the paper; 16: raw 16 x 16 patches (one token per BiXT /16 token)
    stride: int = 1
    fourier_bands: int = 64  # per axis; images: concatenated with the position itself (2 * bands + 1 per axis)
    max_freq: float = 224.0  # images: the grid's side (the paper: the 224 px resolution); points: BiXT's tokenizer
    dim: int = 1024  # latent channels
    heads: int = 8  # latent self-attention heads
    mlp_ratio: float = 1.0
    num_latents: int = 512
    attn_dim: int | None = None  # q/k/v channels of the cross-attention; None: the input's channels (the paper's)
    cross_heads: int = 1
    num_blocks: int = 8  # cross-attends
    self_per_block: int = 6  # latent self-attention layers after each cross-attend
    share_cross: bool = True  # every cross-attend after the first uses one set of weights
    share_latent: bool = True  # every repeat uses the same latent self-attention stack

    _POSITIVE: ClassVar[tuple[str, ...]] = ("num_latents", "dim", "heads", "cross_heads", "num_blocks",
                                            "self_per_block", "mlp_ratio")
    # BiXT's blocks read this.
    cross_attention: ClassVar[str] = "iterative"

    _DEFAULT_FROM: ClassVar[dict[str, str]] = {"attn_dim": "token_dim"}

    def __post_init__(self):
        super().__post_init__()
        if self.attn_dim % self.cross_heads:
            raise ValueError(f"cross-attention dim {self.attn_dim} is not divisible by cross_heads="
                             f"{self.cross_heads}: set attn_dim or cross_heads so that it is")

    @property
    def token_dim(self) -> int:
        """Channels of one input token: raw image values plus position features, or the embedding of BiXT's."""
        if self.modality == "image":
            return self.in_chans * self.patch_size ** 2 + 2 * (2 * self.fourier_bands + 1)
        return self.dim

    @property
    def depth(self) -> int:
        """Latent self-attention layers applied (shared ones counted at every use)."""
        return self.num_blocks * self.self_per_block


def fourier_grid_concat(h: int, w: int, bands: int, max_freq: float, device=None) -> Tensor:
    """The paper's image positions: per axis the coordinate in [-1, 1] and its sin/cos at `bands` frequencies from
    1 to max_freq / 2; (h * w, 2 * (2 * bands + 1))."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in (h, w)]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(h * w, 2)
    return torch.cat((pos, fourier_features(pos, bands, max_freq)), dim=-1)


class FourierConcatTokenizer(nn.Module):
    """Images as the Perceiver reads them: each token is a pixel (or a raw patch_size^2 patch, with BiXT's geometry:
    stride, padding (patch - stride) / 2) with Fourier features of its grid position concatenated. Nothing learned:
    the cross-attention's key/value projections are the embedding."""

    modality = "image"
    example_input = ImageTokenizer.example_input  # the same input contract as BiXT's image tokenizer

    def __init__(self, in_chans: int = 3, patch_size: int = 1, stride: int = 1, img_size: int = 224,
                 fourier_bands: int = 64, max_freq: float = 224.0):
        super().__init__()
        check_patch_geometry(patch_size, stride, img_size)
        self.in_chans, self.patch_size, self.stride = in_chans, patch_size, stride
        self.bands, self.max_freq = fourier_bands, max_freq
        self.default_seq_len = (img_size // stride) ** 2
        self.out_dim = in_chans * patch_size ** 2 + 2 * (2 * fourier_bands + 1)

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.in_chans, self.stride)
        B, _, H, W = x.shape
        values = F.unfold(x, self.patch_size, padding=(self.patch_size - self.stride) // 2, stride=self.stride)
        # float32: in half precision sin(pi * 112 * x) would be noise.
        pos = fourier_grid_concat(H // self.stride, W // self.stride, self.bands, self.max_freq, x.device)
        pos = pos.to(x.dtype)
        return torch.cat((values.transpose(1, 2), pos.expand(B, -1, -1)), dim=-1)


NO_TOKENS = ("Perceiver has no token stream: its latents read the input tokens but never update them, so there are "
             "no per-token outputs; create it with dense_classes=K for a Perceiver IO decoder, or use BiXT or ViT")


def decoder_view(cfg: PerceiverConfig) -> SimpleNamespace:
    """The widths of the Perceiver IO decoder's cross block (bixt.models.blocks.CrossBlock, one-sided): its
    "latents" are the per-token queries (dim wide) and its "tokens" the latent array they read."""
    fields = ("dim", "heads", "mlp_ratio", "qkv_bias", "layerscale", "drop_rate", "attn_drop_rate", "attn_backend",
              "cross_heads", "num_latents")
    return SimpleNamespace(**{f: getattr(cfg, f) for f in fields}, token_dim=cfg.dim, attn_dim=cfg.dim,
                           cross_attention="iterative")


class Perceiver(LatentModel):
    """Perceiver: latents read the (never updated) input tokens again and again.

    model(x) -> logits (B, num_classes); forward_features(x) -> latents (B, M, dim). The tokens are never updated, so
    per-token outputs need a decoder: with dense_classes=K, Perceiver IO's (one query per input token, made from its
    position features, cross-attends to the final latents; then a per-token Linear head), whose cost grows with
    the tokens like BiXT's token stream and shows in the GMACs.
    """

    no_dense = NO_TOKENS

    def __init__(self, cfg: PerceiverConfig):
        super().__init__(cfg)
        if cfg.modality == "image":
            self.tokenizer = FourierConcatTokenizer(cfg.in_chans, cfg.patch_size, cfg.stride, cfg.img_size,
                                                    cfg.fourier_bands, cfg.max_freq)
        else:
            self.tokenizer = build_tokenizer(cfg, cfg.dim)
        self.latents = nn.Parameter(torch.zeros(1, cfg.num_latents, cfg.dim))
        n_cross = min(cfg.num_blocks, 2) if cfg.share_cross else cfg.num_blocks
        n_latent = cfg.self_per_block * (1 if cfg.share_latent else cfg.num_blocks)
        self.cross = nn.ModuleList(CrossBlock(cfg, 0.0, one_sided=True) for _ in range(n_cross))
        self.latent = nn.ModuleList(LatentBlock(cfg, rate) for rate in drop_path_rates(cfg.drop_path_rate, n_latent))
        self.build_head()
        if cfg.dense_classes:
            self.query_proj = Linear(self.query_dim, cfg.dim)
            self.decoder = CrossBlock(decoder_view(cfg), 0.0, one_sided=True)
            self.dense_norm = layer_norm(cfg.dim)
            self.dense_head = Linear(cfg.dim, cfg.dense_classes)
        self.init_weights()

    @property
    def query_dim(self) -> int:
        """Width of a decoder query's features: an image token's grid position (its Fourier features); a point's or
        a sequence element's embedding, which BiXT's tokenizers make from its coordinates or position and id."""
        return 2 * (2 * self.cfg.fourier_bands + 1) if self.cfg.modality == "image" else self.cfg.dim

    def query_features(self, x: Tensor, tok: Tensor) -> Tensor:
        if self.cfg.modality != "image":
            return tok
        s = self.cfg.stride
        pos = fourier_grid_concat(x.shape[-2] // s, x.shape[-1] // s, self.cfg.fourier_bands, self.cfg.max_freq,
                                  x.device)
        return pos.to(tok.dtype).expand(x.shape[0], -1, -1)

    def token_features(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Perceiver IO: one query per input token reads the final latents."""
        tok = self.tokenizer(x)
        lat = self.read(tok, padding_mask)
        out, _ = self.run_layer(self.decoder, self.query_proj(self.query_features(x, tok)), lat, None)
        return self.dense_norm(out)

    @torch.no_grad()
    def init_weights(self) -> None:
        """BiXT's init (truncated-normal latents, then "jax"), so that the same training recipe fits both."""
        nn.init.trunc_normal_(self.latents, std=0.02)
        jax_init_(self)

    def schedule(self) -> list[tuple[int, list[int]]]:
        """For each repeat: the index of its cross-attend and of its latent layers in self.cross / self.latent."""
        spb = self.cfg.self_per_block
        return [(min(i, len(self.cross) - 1), [(0 if self.cfg.share_latent else i * spb) + j for j in range(spb)])
                for i in range(self.cfg.num_blocks)]

    def forward_features(self, x: Tensor, padding_mask: Tensor | None = None, return_tokens: bool = False) -> Tensor:
        if return_tokens:
            raise ValueError(NO_TOKENS)
        return self.read(self.tokenizer(x), padding_mask)

    def read(self, tok: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The latents after every repeat of reading the (never updated) input tokens."""
        check_padding_mask(padding_mask, tok.shape[:2], need_a_token=True)
        lat = self.latents.expand(tok.shape[0], -1, -1)
        for cross, latent in self.schedule():
            lat, _ = self.run_layer(self.cross[cross], lat, tok, padding_mask)
            for j in latent:
                lat = self.run_layer(self.latent[j], lat)
        return lat


# perceiver_imagenet: the paper's ImageNet model (the defaults). perceiver_ti: BiXT-Ti's budget (dim 192, 64 latents,
# 6 heads of 32, MLP ratio 4, 12 distinct latent layers), reading BiXT-Ti/16's 196 tokens as raw 16 x 16 patches
# with the paper's 64-band positions; a cross-attend every 3 latent layers (4 in all), shared after the first.
_TI = {"patch_size": 16, "stride": 16, "max_freq": 14.0, "num_latents": 64, "dim": 192, "attn_dim": 192,
       "cross_heads": 6, "heads": 6, "num_blocks": 4, "self_per_block": 3, "share_latent": False, "mlp_ratio": 4.0}
PERCEIVER_TABLE: dict[str, dict] = {
    "perceiver_imagenet": {},
    "perceiver_ti": {**_TI},
    "perceiver_ti_points": {**_TI, "modality": "points", "in_chans": 3, "seq_len": 1024, "fourier_bands": 16,
                            "max_freq": 32.0, "num_classes": 40},
    "perceiver_ti_text": {**_TI, "modality": "sequence", "in_chans": 0, "vocab_size": 256, "seq_len": 4096,
                          "num_classes": 2},
    # bixt_cpu's sizes (the training comparison's matched set): its 49 patches read raw with 8 Fourier bands per
    # axis, a cross-attend before each of the 4 latent layers, the cross-attention's weights shared after the first.
    "perceiver_cpu": {**_TI, "img_size": 28, "in_chans": 1, "patch_size": 8, "stride": 4, "fourier_bands": 8,
                      "max_freq": 7.0, "num_latents": 16, "dim": 64, "attn_dim": 64, "cross_heads": 2, "heads": 2,
                      "num_blocks": 4, "self_per_block": 1, "num_classes": 10},
    # ... and bixt_shapes' (point clouds): BiXT's point tokenizer, 32 latents.
    "perceiver_shapes": {**_TI, "modality": "points", "in_chans": 3, "seq_len": 1024, "fourier_bands": 16,
                         "max_freq": 32.0, "num_latents": 32, "dim": 64, "attn_dim": 64, "cross_heads": 2, "heads": 2,
                         "num_blocks": 4, "self_per_block": 1, "num_classes": 10},
}
CONFIGS: dict[str, PerceiverConfig] = {name: PerceiverConfig(**row) for name, row in PERCEIVER_TABLE.items()}
register_family("perceiver", CONFIGS, Perceiver)
