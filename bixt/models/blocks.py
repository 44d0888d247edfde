"""The two blocks every family here is built from: BiXT's cross block (latents and tokens exchange information; the
Perceiver's cross-attend is its one-sided form) and a ViT-style self-attention block (BiXT's latent block, every ViT
block). They read their widths from any model config with BiXT's field names (dim, token_dim, attn_dim, cross_heads,
cross_attention, heads, mlp_ratio, layerscale, the dropout rates, attn_backend)."""
from __future__ import annotations

from torch import Tensor, nn

from bixt.nn.attention import BiDirectionalCrossAttention, SelfAttention, SequentialCrossAttention
from bixt.nn.layers import DropPath, Mlp, add_per_token, layer_norm, scaled


class CrossBlock(nn.Module):
    def __init__(self, cfg, drop_path: float, one_sided: bool):
        super().__init__()
        d, dt, hidden = cfg.dim, cfg.token_dim, int(cfg.dim * cfg.mlp_ratio)
        self.one_sided = one_sided
        self.sequential = cfg.cross_attention == "sequential"
        self.norm_lat = layer_norm(d)
        self.norm_tok = layer_norm(dt)
        attn = SequentialCrossAttention if self.sequential else BiDirectionalCrossAttention
        self.attn = attn(d, dt, cfg.attn_dim, cfg.cross_heads, bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate,
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
        if self.sequential:
            return self._forward_sequential(lat, tok, padding_mask)
        dlat, dtok = self.attn.attend(self.norm_lat(lat), self.norm_tok(tok), padding_mask)
        # Each stream's two residual updates (projected attention output, then MLP) in one sweep: in CPU inference,
        # chunk by chunk, the projected update never exists whole (bixt.nn.layers.add_per_token).
        lat = add_per_token(lat, self._latent_mlp, self.training,
                            first=(dlat, lambda t: self.drop_path(self.ls1_lat(self.attn.project_latents(t)))))
        if self.one_sided:
            return lat, tok
        return lat, add_per_token(tok, self._token_mlp, self.training,
                                  first=(dtok, lambda t: self.drop_path(self.ls1_tok(self.attn.project_tokens(t)))))

    def _forward_sequential(self, lat: Tensor, tok: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        tok_n = self.norm_tok(tok)
        lat = lat + self.drop_path(self.ls1_lat(self.attn.read_tokens(self.norm_lat(lat), tok_n, padding_mask)))
        lat = add_per_token(lat, self._latent_mlp, self.training)
        if self.one_sided:
            return lat, tok
        # only now, after the latents' update, do the tokens read them
        tok = tok + self.drop_path(self.ls1_tok(self.attn.read_latents(tok_n, self.norm_lat_read(lat))))
        return lat, add_per_token(tok, self._token_mlp, self.training)

    def _latent_mlp(self, lat: Tensor) -> Tensor:
        return self.drop_path(self.ls2_lat(self.mlp_lat(self.mlp_norm_lat(lat))))

    def _token_mlp(self, tok: Tensor) -> Tensor:
        return self.drop_path(self.ls2_tok(self.mlp_tok(self.mlp_norm_tok(tok))))


class LatentBlock(nn.Module):
    """ViT-style pre-norm self-attention block over the latents."""

    def __init__(self, cfg, drop_path: float):
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
        return add_per_token(x, lambda t: self.drop_path(self.ls2(self.mlp(self.norm2(t)))), self.training,
                             first=(self.attn.attend(self.norm1(x), key_padding_mask),
                                    lambda t: self.drop_path(self.ls1(self.attn.project(t)))))
