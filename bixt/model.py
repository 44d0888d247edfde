"""BiXT: a small set of learned latents and the token stream, refined together by bi-directional attention.

One layer = cross block (both streams read the same pre-update states; MLPs on both) + latent self-attention
block. The last layer of a classifier is one-sided (only latents attend); dense models keep it two-sided.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bixt.attention import BiDirectionalCrossAttention, SelfAttention, SequentialCrossAttention, check_backend
from bixt.configs import BiXTConfig
from bixt.layers import DropPath, Mlp, add_per_token, check_padding_mask, layer_norm, scaled
from bixt.tokenizers import build_tokenizer


class CrossBlock(nn.Module):
    def __init__(self, cfg: BiXTConfig, drop_path: float, one_sided: bool):
        super().__init__()
        d, dt, hidden = cfg.dim, cfg.tok_dim, int(cfg.dim * cfg.mlp_ratio)
        self.one_sided = one_sided
        self.sequential = cfg.cross_attention == "sequential"
        self.norm_lat = layer_norm(d)
        self.norm_tok = layer_norm(dt)
        attn = SequentialCrossAttention if self.sequential else BiDirectionalCrossAttention
        self.attn = attn(d, dt, cfg.cross_attn_dim, cfg.ca_heads, bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate,
                         proj_drop=cfg.drop_rate, one_sided=one_sided, backend=cfg.attn_backend)
        if self.sequential and not one_sided:
            self.norm_lat_read = layer_norm(d)  # the updated latents, as the tokens read them
        self.drop_path = DropPath(drop_path)
        self.ls1_lat, self.ls2_lat = scaled(d, cfg.layerscale), scaled(d, cfg.layerscale)
        self.mlp_norm_lat = layer_norm(d)
        self.mlp_lat = Mlp(d, hidden, cfg.drop_rate)
        if not one_sided:
            self.ls1_tok, self.ls2_tok = scaled(dt, cfg.layerscale), scaled(dt, cfg.layerscale)
            self.mlp_norm_tok = layer_norm(dt)
            self.mlp_tok = Mlp(dt, int(dt * cfg.mlp_ratio), cfg.drop_rate)

    def forward(self, lat: Tensor, tok: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        tok_n = self.norm_tok(tok)
        if self.sequential:
            dlat = self.attn.read_tokens(self.norm_lat(lat), tok_n, padding_mask)
        else:
            dlat, dtok = self.attn(self.norm_lat(lat), tok_n, padding_mask)
        lat = lat + self.drop_path(self.ls1_lat(dlat))
        lat = lat + self.drop_path(self.ls2_lat(self.mlp_lat(self.mlp_norm_lat(lat))))
        if self.one_sided:
            return lat, tok
        if self.sequential:  # only now, after the latents' update, do the tokens read them
            dtok = self.attn.read_latents(tok_n, self.norm_lat_read(lat))
        tok = tok + self.drop_path(self.ls1_tok(dtok))
        return lat, add_per_token(tok, lambda t: self.drop_path(self.ls2_tok(self.mlp_tok(self.mlp_norm_tok(t)))),
                                  self.training)


class LatentBlock(nn.Module):
    """ViT-style pre-norm self-attention block over the latents."""

    def __init__(self, cfg: BiXTConfig, drop_path: float):
        super().__init__()
        d = cfg.dim
        self.norm1 = layer_norm(d)
        self.attn = SelfAttention(d, cfg.heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate, cfg.attn_backend)
        self.ls1 = scaled(d, cfg.layerscale)
        self.norm2 = layer_norm(d)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), cfg.drop_rate)
        self.ls2 = scaled(d, cfg.layerscale)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), key_padding_mask)))
        return add_per_token(x, lambda t: self.drop_path(self.ls2(self.mlp(self.norm2(t)))), self.training)


class BiXTLayer(nn.Module):
    def __init__(self, cfg: BiXTConfig, drop_path: float, one_sided: bool):
        super().__init__()
        self.cross = CrossBlock(cfg, drop_path, one_sided)
        self.latent = LatentBlock(cfg, drop_path)

    def forward(self, lat: Tensor, tok: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lat, tok = self.cross(lat, tok, padding_mask)
        return self.latent(lat), tok


class BiXT(nn.Module):
    """Bi-Directional Cross-Attention Transformer for images, point clouds and sequences.

    model(x) -> logits (B, num_classes), or per-token logits (B, N, dense_classes) for a dense-only model;
    forward_features(x) -> latents (B, M, dim); with return_tokens=True also the token stream (B, N, token_dim)
    out of the last layer that updates tokens; forward_dense(x) -> (B, N, dense_classes).
    `padding_mask` (B, N) bool, True marking padding: padded tokens change no latent.
    """

    def __init__(self, cfg: BiXTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dim
        self.tokenizer = build_tokenizer(cfg, cfg.tok_dim)
        self.latents = nn.Parameter(torch.zeros(1, cfg.num_latents, cfg.dim))
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.layers = nn.ModuleList(
            BiXTLayer(cfg, rates[i],
                      one_sided=not cfg.refines_tokens or (i == cfg.depth - 1 and not cfg.two_sided_last))
            for i in range(cfg.depth))
        # Mean of the latents, then norm and linear (the authors' fc_norm; there is no norm before pooling).
        self.fc_norm = layer_norm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        if cfg.dense_classes:
            self.dense_norm = layer_norm(cfg.tok_dim)
            self.dense_head = nn.Linear(cfg.tok_dim, cfg.dense_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' "jax" init: xavier Linear weights, zero biases (normal 1e-6 in MLPs), zero heads,
        lecun-normal convs, truncated-normal latents."""
        nn.init.trunc_normal_(self.latents, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name in ("head", "dense_head"):
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
                    continue
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1e-6) if "mlp" in name else nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                # lecun normal, truncated at 2 std with the std corrected for the truncation (as timm).
                std = math.sqrt(1.0 / m.weight[0].numel()) / 0.87962566103423978
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_backend(self, backend: str) -> BiXT:
        """Switch every attention op to `backend` (math | sdpa | xformers | auto)."""
        check_backend(backend)
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        return self

    def forward_features(self, x: Tensor, padding_mask: Tensor | None = None,
                         return_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        tok = self.tokenizer(x)
        check_padding_mask(padding_mask, tok.shape[:2], need_a_token=True)
        lat = self.latents.expand(tok.shape[0], -1, -1)
        tokens_out = tok
        for layer in self.layers:
            lat, tok = layer(lat, tok, padding_mask)
            if not layer.cross.one_sided:
                tokens_out = tok
        return (lat, tokens_out) if return_tokens else lat

    def forward_head(self, latents: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.fc_norm(latents.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward_dense(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if not self.cfg.dense_classes:
            raise ValueError("this model has no dense head: create it with dense_classes=K for per-token logits")
        _, tok = self.forward_features(x, padding_mask, return_tokens=True)
        return self.dense_head(self.dense_norm(tok))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if self.cfg.dense_classes and not self.cfg.num_classes:
            return self.forward_dense(x, padding_mask)
        return self.forward_head(self.forward_features(x, padding_mask))
