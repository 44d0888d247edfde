"""Tokenizers: turn images, point clouds or sequences into a (B, N, dim) token stream.

One interface for every modality, so BiXT and the baselines can be handed the same tensors:
  forward(x) -> (B, N, dim)
  forward(x, shard) -> (B, stop - start, dim): only this process's tokens (bixt.nn.sharding), positions global
  token_span(x, shard) -> (start, stop, N): where this process's tokens sit among the N tokens of x
    (these two are optional: ConvImageTokenizer has neither, and BiXT refuses to shard its tokens)
  example_input(batch_size, seq_len) -> a random input that yields exactly seq_len tokens
  default_seq_len: the number of tokens at the model's default input
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bixt.nn.linear import Linear
from bixt.nn.posenc import fourier_features, fourier_grid_2d, sincos_1d
from bixt.nn.sharding import TokenShard

MODALITIES = ("image", "points", "sequence")
# How an image becomes tokens: one strided conv over (possibly overlapping) patches, or the authors' convolutional
# stem (their `BiXTConvTok`, timm/models/bixt_convtok.py): stacked 3x3 stride-2 convs with BatchNorm.
IMAGE_TOKENIZERS = ("patch", "conv")


def _check_rank(x: Tensor, rank: int | tuple[int, ...], what: str) -> None:
    ranks = (rank,) if isinstance(rank, int) else rank
    if x.ndim not in ranks:
        raise ValueError(f"{what}, got a tensor of shape {tuple(x.shape)}")


def _check_seq_len(seq_len: int) -> None:
    if seq_len <= 0:
        raise ValueError(f"sequence length must be positive, got {seq_len}")


def nearest_squares(n: int) -> tuple[int, int]:
    root = math.isqrt(max(n, 1))
    return root * root, (root + 1) ** 2


def check_patch_geometry(patch_size: int, stride: int, img_size: int) -> None:
    """Patches of `patch_size` every `stride` pixels, padded by (patch_size - stride) / 2: one token per stride."""
    if stride <= 0 or stride > patch_size or (patch_size - stride) % 2:
        raise ValueError(f"stride {stride} does not fit patch size {patch_size}: use a stride <= the patch "
                         "size with an even difference (16 with 16, 8 or 4)")
    if img_size % stride:
        raise ValueError(f"image size {img_size} is not divisible by the stride {stride}: use a multiple of {stride}")


def check_image(x: Tensor, in_chans: int, stride: int) -> None:
    _check_rank(x, 4, f"image models take (B, {in_chans}, H, W) images")
    _, C, H, W = x.shape
    if C != in_chans:
        raise ValueError(f"expected {in_chans} image channels, got {C}: convert the images or create "
                         f"the model with in_chans={C}")
    if H % stride or W % stride:
        raise ValueError(f"image size {H}x{W} is not divisible by the stride {stride}: resize or crop "
                         f"to a multiple of {stride}")


class FourierPosEmbed2d(nn.Module):
    """Fixed 2-D Fourier features of the token grid, projected by a learned 1x1 conv and added to the tokens.

    With `grid` given, the features of that grid are kept as the buffer `pos` (the authors' fixed-size models
    store it in their checkpoints); any other grid is computed on the fly, so one model runs at any size.
    """

    def __init__(self, dim: int, grid: tuple[int, int] | None = None, hidden: int = 32):
        super().__init__()
        self.hidden = hidden
        self.proj = nn.Conv2d(2 * hidden, dim, kernel_size=1)
        if grid is not None:
            self.register_buffer("pos", fourier_grid_2d(*grid, hidden=hidden))

    def forward(self, h: int, w: int, rows: tuple[int, int] | None = None) -> Tensor:
        """(h * w, dim); with `rows` = (r0, r1) only those rows of the grid."""
        pos = getattr(self, "pos", None)
        if pos is None or pos.shape[1:] != (h, w):
            pos = fourier_grid_2d(h, w, hidden=self.hidden, device=self.proj.weight.device, rows=rows)
        elif rows is not None:
            pos = pos[:, rows[0]:rows[1]]
        return self.proj(pos.to(self.proj.weight.dtype)).flatten(1).transpose(0, 1)  # (h * w, dim)


class ImageTokenizer(nn.Module):
    """Conv patch embedding: kernel `patch_size`, stride `stride`, padding (patch_size - stride) / 2.

    stride 16, 8, 4 with patch 16 are the authors' /16, /8 (`p16s8`) and /4 (`p16s4`) tokenizers: the last two
    are overlapping 16x16 patches. An H x W image gives an (H / stride) x (W / stride) grid.
    """

    modality = "image"

    def __init__(self, dim: int, in_chans: int = 3, patch_size: int = 16, stride: int = 16, img_size: int = 224,
                 pos_buffer: bool = True):
        super().__init__()
        check_patch_geometry(patch_size, stride, img_size)
        self.in_chans, self.stride, self.img_size = in_chans, stride, img_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride,
                              padding=(patch_size - stride) // 2)
        grid = img_size // stride
        self.default_seq_len = grid * grid
        self.pos_embed = FourierPosEmbed2d(dim, grid=(grid, grid) if pos_buffer else None)

    def forward(self, x: Tensor, shard: TokenShard | None = None) -> Tensor:
        check_image(x, self.in_chans, self.stride)
        if shard is None:
            x = self.proj(x)
            return x.flatten(2).transpose(1, 2) + self.pos_embed(*x.shape[2:])
        # A band of token rows, convolved from a VIEW of the image (no copy kept for backward): c token rows of
        # context on either side cover the overlapping patches' halo, the image's edges get the conv's zero padding,
        # and the context rows' outputs are dropped.
        s, pad = self.stride, self.proj.padding[0]
        h, w, r0, r1 = self._rows(x, shard)
        c = -(-pad // s)
        v0, v1 = max(r0 - c, 0), min(r1 + c, h)
        y = F.conv2d(x[:, :, v0 * s:v1 * s], self.proj.weight, self.proj.bias, stride=s, padding=pad)
        y = y[:, :, r0 - v0:r1 - v0]
        return y.flatten(2).transpose(1, 2) + self.pos_embed(h, w, rows=(r0, r1))

    def token_span(self, x: Tensor, shard: TokenShard) -> tuple[int, int, int]:
        check_image(x, self.in_chans, self.stride)
        h, w, r0, r1 = self._rows(x, shard)
        return r0 * w, r1 * w, h * w

    def _rows(self, x: Tensor, shard: TokenShard) -> tuple[int, int, int, int]:
        """The token grid (h, w) of x and this process's band of its rows, [r0, r1)."""
        h, w = x.shape[2] // self.stride, x.shape[3] // self.stride
        return h, w, *shard.span(h, "token rows")

    def example_input(self, batch_size: int, seq_len: int | None = None, device=None, dtype=None) -> Tensor:
        seq_len = seq_len or self.default_seq_len
        _check_seq_len(seq_len)
        side = math.isqrt(seq_len)
        if side * side != seq_len:
            lo, hi = nearest_squares(seq_len)
            raise ValueError(f"an image model needs a square number of tokens, got {seq_len}: "
                             f"use {lo} or {hi} (a {math.isqrt(lo)}^2 or {math.isqrt(hi)}^2 grid)")
        return torch.randn(batch_size, self.in_chans, side * self.stride, side * self.stride, device=device,
                           dtype=dtype)


def conv_stem_widths(dim: int, patch_size: int) -> list[int]:
    """Output channels of the conv tokenizer's stages: one 3x3 stride-2 conv per halving of the image side
    (log2(patch_size) of them), each stage twice as wide as the one before, the last `dim` wide
    (dim/8, dim/4, dim/2, dim for patch 16; dim/4, dim/2, dim for 8; dim/2, dim for 4)."""
    stages = patch_size.bit_length() - 1
    return [dim >> (stages - 1 - i) for i in range(stages)]


def check_conv_geometry(patch_size: int, stride: int, img_size: int, dim: int) -> None:
    """The conv tokenizer halves the image side log2(patch_size) times: one token per patch_size x patch_size."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"the conv tokenizer needs a power-of-two patch size (4, 8, 16), got {patch_size}")
    if stride != patch_size:
        raise ValueError(f"the conv tokenizer makes one token per {patch_size}x{patch_size} patch (no overlap): set "
                         f"stride={patch_size} to match patch_size={patch_size}, got stride={stride}")
    if dim % (patch_size // 2):
        raise ValueError(f"the conv tokenizer's first stage is dim / {patch_size // 2} wide: dim {dim} is not "
                         f"divisible by {patch_size // 2}")
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}: use a multiple of "
                         f"{patch_size}")


class ConvImageTokenizer(nn.Module):
    """The authors' convolutional tokenizer (their `ConvPatchEmbed`, XCiT's stem): log2(patch_size) stages of a
    3x3 stride-2 conv (padding 1, no bias) and BatchNorm, GELU between stages, then the Fourier positions added as in
    ImageTokenizer. An H x W image gives an (H / patch_size) x (W / patch_size) grid. `proj` keeps the authors'
    layout (stage i at index 2i, its conv and norm at .0 and .1), so their checkpoints load by renaming alone.

    No `token_span`: every stage's receptive field spans rows of the others, so this tokenizer does not shard.
    """

    modality = "image"

    def __init__(self, dim: int, in_chans: int = 3, patch_size: int = 16, img_size: int = 224,
                 pos_buffer: bool = True):
        super().__init__()
        check_conv_geometry(patch_size, patch_size, img_size, dim)
        self.in_chans, self.stride, self.img_size = in_chans, patch_size, img_size
        stages: list[nn.Module] = []
        width_in = in_chans
        for width in conv_stem_widths(dim, patch_size):
            if stages:
                stages.append(nn.GELU())
            stages.append(nn.Sequential(nn.Conv2d(width_in, width, kernel_size=3, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(width)))
            width_in = width
        self.proj = nn.Sequential(*stages)
        grid = img_size // patch_size
        self.default_seq_len = grid * grid
        self.pos_embed = FourierPosEmbed2d(dim, grid=(grid, grid) if pos_buffer else None)

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.in_chans, self.stride)
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2) + self.pos_embed(*x.shape[2:])

    example_input = ImageTokenizer.example_input  # the same square images, one token per `stride` pixels


class PointTokenizer(nn.Module):
    """Points (B, N, in_chans): xyz in [-1, 1] first, then any per-point features (normals, colours...).

    Each point becomes one token: a linear embedding of all its channels plus a linear projection of Fourier
    features of its coordinates. No neighbourhood grouping: BiXT's tokens refine themselves.
    """

    modality = "points"

    def __init__(self, dim: int, in_chans: int = 3, fourier_bands: int = 16, max_freq: float = 32.0,
                 seq_len: int = 1024):
        super().__init__()
        if in_chans < 3:
            raise ValueError(f"point clouds need at least the 3 coordinates per point, got in_chans={in_chans}")
        self.in_chans, self.bands, self.max_freq = in_chans, fourier_bands, max_freq
        self.default_seq_len = seq_len
        self.embed = Linear(in_chans, dim)
        self.pos_proj = Linear(3 * 2 * fourier_bands, dim)

    def forward(self, x: Tensor, shard: TokenShard | None = None) -> Tensor:
        _check_rank(x, 3, f"point models take (B, N, {self.in_chans}) point clouds")
        if x.shape[-1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} channels per point, got {x.shape[-1]}: create the model "
                             f"with in_chans={x.shape[-1]}")
        if shard is not None:  # every point is a token of its own: a shard is a subset of the points
            x = x[:, slice(*self.token_span(x, shard)[:2])]
        return self.embed(x) + self.pos_proj(fourier_features(x[..., :3], self.bands, self.max_freq))

    def token_span(self, x: Tensor, shard: TokenShard) -> tuple[int, int, int]:
        return *shard.span(x.shape[1], "points"), x.shape[1]

    def example_input(self, batch_size: int, seq_len: int | None = None, device=None, dtype=None) -> Tensor:
        seq_len = seq_len or self.default_seq_len
        _check_seq_len(seq_len)
        return torch.rand(batch_size, seq_len, self.in_chans, device=device, dtype=dtype) * 2 - 1


class SequenceTokenizer(nn.Module):
    """Sequences: integer ids (B, N) with `vocab_size` > 0, else features (B, N, in_chans); 1-D sin-cos positions."""

    modality = "sequence"

    def __init__(self, dim: int, in_chans: int = 0, vocab_size: int = 0, seq_len: int = 1024):
        super().__init__()
        if (vocab_size > 0) == (in_chans > 0):
            raise ValueError("a sequence model takes either integer ids (set vocab_size) or feature vectors "
                             f"(set in_chans), got vocab_size={vocab_size}, in_chans={in_chans}")
        self.in_chans, self.vocab_size, self.dim = in_chans, vocab_size, dim
        self.default_seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, dim) if vocab_size else Linear(in_chans, dim)

    def forward(self, x: Tensor, shard: TokenShard | None = None) -> Tensor:
        if self.vocab_size:
            _check_rank(x, 2, "this sequence model takes (B, N) integer token ids")
            if x.is_floating_point():
                raise ValueError("this sequence model takes integer token ids, got floats: pass a long tensor")
        else:
            _check_rank(x, 3, f"this sequence model takes (B, N, {self.in_chans}) features")
        start = 0
        if shard is not None:  # a span of the sequence, with the positions of its place in the whole
            start, stop, _ = self.token_span(x, shard)
            x = x[:, start:stop]
        tokens = self.embed(x)
        return tokens + sincos_1d(x.shape[1], self.dim, device=x.device, start=start).to(tokens.dtype)

    def token_span(self, x: Tensor, shard: TokenShard) -> tuple[int, int, int]:
        return *shard.span(x.shape[1], "sequence positions"), x.shape[1]

    def example_input(self, batch_size: int, seq_len: int | None = None, device=None, dtype=None) -> Tensor:
        seq_len = seq_len or self.default_seq_len
        _check_seq_len(seq_len)
        if self.vocab_size:
            return torch.randint(self.vocab_size, (batch_size, seq_len), device=device)
        return torch.randn(batch_size, seq_len, self.in_chans, device=device, dtype=dtype)


def build_tokenizer(cfg, dim: int) -> nn.Module:
    """The tokenizer a model config asks for (any config with the input fields of `BiXTConfig`)."""
    if cfg.modality == "image":
        if getattr(cfg, "tokenizer", "patch") == "conv":  # only BiXT's config offers the choice
            return ConvImageTokenizer(dim, cfg.in_chans, cfg.patch_size, cfg.img_size, cfg.pos_buffer)
        return ImageTokenizer(dim, cfg.in_chans, cfg.patch_size, cfg.stride, cfg.img_size, cfg.pos_buffer)
    if cfg.modality == "points":
        return PointTokenizer(dim, cfg.in_chans, cfg.fourier_bands, cfg.max_freq, cfg.seq_len)
    if cfg.modality == "sequence":
        return SequenceTokenizer(dim, cfg.in_chans, cfg.vocab_size, cfg.seq_len)
    raise ValueError(f"unknown modality {cfg.modality!r}: choose one of {', '.join(MODALITIES)}")
