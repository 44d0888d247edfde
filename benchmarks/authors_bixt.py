"""The authors' BiXT (mrkshllr/BiXT, `timm/models/bixt.py`) re-stated for benchmarks: the yardstick our model's
speed is measured against.

What is kept from their code, because it decides what the computation costs:
- the layer order: a cross block (both streams normalised, ONE similarity matrix, a softmax of it along the tokens and
  a second one of its transpose along the latents, both outputs projected) with the latents' residual and MLP, then
  the tokens' residual and MLP, then a self-attention block over the latents; the last layer is one-sided;
- plain matmul attention, whole tensors, no chunking and no fused kernels;
- timm's Mlp (fc1, GELU, fc2), nn.LayerNorm with eps 1e-6, the fused rv / qkv projections;
- the latents enter the first layer with batch 1 and broadcast in its similarity matmul;
- their parameter names, so their checkpoints (and ours, through `bixt.models.official.bixt_to_official`) load.
Dropout, drop-path and layer scale are left out: the benchmarks run with all of them off, where they cost nothing in
the authors' code either (nn.Identity). `tests/test_authors_restatement.py` checks that this module reproduces the
parity fixtures, outputs the authors' own code computed.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bixt.nn.posenc import fourier_grid_2d


def _norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def _heads(x: Tensor, parts: int, heads: int) -> tuple[Tensor, ...]:
    B, L, _ = x.shape
    return x.reshape(B, L, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge(x: Tensor, batch: int) -> Tensor:
    return x.transpose(1, 2).reshape(batch, x.shape[2], -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = _heads(self.qkv(x), 3, self.heads)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj(_merge(attn @ v, x.shape[0]))


class CrossAttention(nn.Module):
    """Both directions from one similarity matrix; `one_sided`: the latents' direction only."""

    def __init__(self, dim: int, heads: int, one_sided: bool):
        super().__init__()
        self.heads, self.scale, self.one_sided = heads, (dim // heads) ** -0.5, one_sided
        if one_sided:
            self.r_latents = nn.Linear(dim, dim)
        else:
            self.rv_latents = nn.Linear(dim, 2 * dim)
            self.proj_pat = nn.Linear(dim, dim)
        self.rv_patches = nn.Linear(dim, 2 * dim)
        self.proj_lat = nn.Linear(dim, dim)

    def forward(self, lat: Tensor, pat: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.one_sided:
            (r_lat,) = _heads(self.r_latents(lat), 1, self.heads)
        else:
            r_lat, v_lat = _heads(self.rv_latents(lat), 2, self.heads)
        r_pat, v_pat = _heads(self.rv_patches(pat), 2, self.heads)
        attn = (r_lat @ r_pat.transpose(-2, -1)) * self.scale  # (B, H, M, N); B broadcasts from the latents' 1
        B = pat.shape[0]
        new_lat = self.proj_lat(_merge(attn.softmax(dim=-1) @ v_pat, B))
        if self.one_sided:
            return new_lat, None
        new_pat = self.proj_pat(_merge(attn.transpose(-2, -1).softmax(dim=-1) @ v_lat, B))
        return new_lat, new_pat


class CABlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, one_sided: bool):
        super().__init__()
        self.one_sided = one_sided
        self.norm1_lat, self.norm1_pat = _norm(dim), _norm(dim)
        self.attn = CrossAttention(dim, heads, one_sided)
        self.norm2_lat, self.mlp_lat = _norm(dim), Mlp(dim, hidden)
        if not one_sided:
            self.norm2_pat, self.mlp_pat = _norm(dim), Mlp(dim, hidden)

    def forward(self, lat: Tensor, pat: Tensor) -> tuple[Tensor, Tensor | None]:
        d_lat, d_pat = self.attn(self.norm1_lat(lat), self.norm1_pat(pat))
        lat = lat + d_lat
        lat = lat + self.mlp_lat(self.norm2_lat(lat))
        if self.one_sided:
            return lat, None
        pat = pat + d_pat
        return lat, pat + self.mlp_pat(self.norm2_pat(pat))


class SABlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = _norm(dim), SelfAttention(dim, heads)
        self.norm2, self.mlp = _norm(dim), Mlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BiXTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, one_sided: bool):
        super().__init__()
        self.cross_attention_latents_token = CABlock(dim, heads, hidden, one_sided)
        self.self_attention_latents = SABlock(dim, heads, hidden)

    def forward(self, lat: Tensor, pat: Tensor) -> tuple[Tensor, Tensor | None]:
        lat, pat = self.cross_attention_latents_token(lat, pat)
        return self.self_attention_latents(lat), pat


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FourierPosEncode(nn.Module):
    """A fixed grid of 2 x 32 sin-cos features per token, projected to the width by a 1x1 conv at every forward."""

    def __init__(self, grid: int, dim: int, hidden: int = 32):
        super().__init__()
        self.register_buffer("pos", fourier_grid_2d(grid, grid, hidden))
        self.token_projection = nn.Conv2d(2 * hidden, dim, 1)

    def forward_add(self, x: Tensor) -> Tensor:
        return x + self.token_projection(self.pos[None]).flatten(2).transpose(1, 2)


class AuthorsBiXT(nn.Module):
    """BiXT for images with the /16 patch tokenizer and the stored Fourier grid: BiXT-Ti/16 by default."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 num_latents: int = 64, dim: int = 192, depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.fourier_pos_encode = FourierPosEncode(img_size // patch_size, dim)
        self.latents = nn.Parameter(torch.zeros(1, num_latents, dim))
        self.blocks = nn.ModuleList(BiXTBlock(dim, heads, hidden, one_sided=i == depth - 1) for i in range(depth))
        self.fc_norm, self.head = _norm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        pat = self.fourier_pos_encode.forward_add(self.patch_embed(x))
        lat = self.latents
        for block in self.blocks:
            lat, pat = block(lat, pat)
        return self.head(self.fc_norm(lat.mean(dim=1)))
