"""BiXT: a small set of learned latents and the token stream, refined together by bi-directional attention.

One layer = cross block (both streams read the same pre-update states; MLPs on both) + latent self-attention
block. The last layer of a classifier is one-sided (only latents attend); dense models keep it two-sided.
This module registers the "bixt" family (the authors' configurations, BIXT-FACTS.md section 2) and the
"bixt-ablation" family (the paper's Table 1 attention patterns), with the authors' checkpoint layout as their filter.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bixt.models.base import LatentModel, jax_init_
from bixt.models.bixt_configs import ABLATION_CONFIGS, CONFIGS, BiXTConfig
from bixt.models.blocks import CrossBlock, LatentBlock
from bixt.models.official import checkpoint_filter_fn
from bixt.models.registry import register_family
from bixt.nn.layers import check_padding_mask, drop_path_rates, layer_norm
from bixt.nn.linear import Linear
from bixt.nn.sharding import TokenShard, check_shard_backend
from bixt.nn.tokenizers import build_tokenizer


class BiXTLayer(nn.Module):
    def __init__(self, cfg: BiXTConfig, drop_path: float, one_sided: bool):
        super().__init__()
        self.cross = CrossBlock(cfg, drop_path, one_sided)
        self.latent = LatentBlock(cfg, drop_path)

    def forward(self, lat: Tensor, tok: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lat, tok = self.cross(lat, tok, padding_mask)
        return self.latent(lat), tok


class BiXT(LatentModel):
    """Bi-Directional Cross-Attention Transformer for images, point clouds and sequences.

    model(x) -> logits (B, num_classes), or per-token logits (B, N, dense_classes) for a dense-only model;
    forward_features(x) -> latents (B, M, dim); with return_tokens=True also the token stream (B, N, token_dim)
    out of the last layer that updates tokens; forward_dense(x) -> (B, N, dense_classes).
    `padding_mask` (B, N) bool, True marking padding: padded tokens change no latent.
    """

    def __init__(self, cfg: BiXTConfig):
        super().__init__(cfg)
        self.tokenizer = build_tokenizer(cfg, cfg.token_dim)
        self.latents = nn.Parameter(torch.zeros(1, cfg.num_latents, cfg.dim))
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.layers = nn.ModuleList(
            BiXTLayer(cfg, rates[i],
                      one_sided=not cfg.refines_tokens or (i == cfg.depth - 1 and not cfg.two_sided_last))
            for i in range(cfg.depth))
        self.build_head()
        if cfg.dense_classes:
            self.dense_norm = layer_norm(cfg.token_dim)
            self.dense_head = Linear(cfg.token_dim, cfg.dense_classes)
        self.token_shard: TokenShard | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' init: truncated-normal latents, then "jax" (xavier Linear, zero heads, lecun-normal convs)."""
        nn.init.trunc_normal_(self.latents, std=0.02)
        jax_init_(self)

    def shard_tokens(self, shard: TokenShard | None) -> BiXT:
        """Compute only this process's part of every sample's tokens (`shard`; None: all of them again).

        The input and padding mask stay whole (every process passes the same); the tokenizer cuts this process's
        span, with the positions of its place in the whole. Latents, logits and features are the same on every
        process, token features and dense logits are this process's tokens. Gradients: bixt.nn.sharding."""
        if shard is not None:
            if not callable(getattr(self.tokenizer, "token_span", None)):
                raise ValueError(f"{type(self.tokenizer).__name__} cannot cut its part of the tokens: token sharding "
                                 "needs a tokenizer with token_span (patch images, points, sequences)")
            if self.cfg.drop_rate or self.cfg.attn_drop_rate:
                raise ValueError("token sharding needs drop_rate=0 and attn_drop_rate=0: element-wise dropout of "
                                 "different numbers of tokens would set the processes' random streams apart, and with "
                                 "them the latents every process computes (drop_path_rate is fine)")
            for m in self.modules():
                if m is not self and hasattr(m, "token_shard"):
                    check_shard_backend(m.backend)
        for m in self.modules():
            if hasattr(m, "token_shard"):  # the model and its cross-attentions
                m.token_shard = shard
        return self

    def forward_features(self, x: Tensor, padding_mask: Tensor | None = None,
                         return_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        shard = self.token_shard
        if shard is None:
            tok = self.tokenizer(x)
            check_padding_mask(padding_mask, tok.shape[:2], need_a_token=True)
        else:
            start, stop, total = self.tokenizer.token_span(x, shard)
            check_padding_mask(padding_mask, (x.shape[0], total), need_a_token=True)
            tok = self.tokenizer(x, shard)
            padding_mask = None if padding_mask is None else padding_mask[:, start:stop]
        lat = self.latents.expand(tok.shape[0], -1, -1)
        tokens_out = tok
        for layer in self.layers:
            lat, tok = self.run_layer(layer, lat, tok, padding_mask)
            if not layer.cross.one_sided:
                tokens_out = tok
        return (lat, tokens_out) if return_tokens else lat

    def token_features(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        _, tok = self.forward_features(x, padding_mask, return_tokens=True)
        return self.dense_norm(tok)


register_family("bixt", CONFIGS, BiXT, checkpoint_filter=checkpoint_filter_fn)
register_family("bixt-ablation", ABLATION_CONFIGS, BiXT, checkpoint_filter=checkpoint_filter_fn)
