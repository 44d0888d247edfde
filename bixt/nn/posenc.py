"""Fixed positional features: 2-D Fourier grid (images), 1-D sin-cos (sequences), Fourier features (points)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def fourier_grid_2d(h: int, w: int, hidden: int = 32, temperature: float = 10000.0,
                    device: torch.device | None = None, rows: tuple[int, int] | None = None) -> Tensor:
    """DETR/XCiT sin-cos features of an h x w token grid: (2 * hidden, h, w), y features first; `rows` = (r0, r1):
    only those rows of the grid, (2 * hidden, r1 - r0, w), the same values (a token shard's part).

    Computed in float32 in the same order as the authors' code, so their stored buffer matches bit for bit.
    """
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)
    y = y / (y[-1:] + eps) * scale
    if rows is not None:
        y = y[rows[0]:rows[1]]
    x = x / (x[-1:] + eps) * scale
    dim_t = torch.arange(hidden, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / hidden)

    def interleave(v: Tensor) -> Tensor:  # (L,) -> (L, hidden) as sin, cos, sin, cos, ...
        v = v[:, None] / dim_t
        return torch.stack((v[:, 0::2].sin(), v[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = interleave(y)[:, None, :].expand(len(y), w, hidden)
    pos_x = interleave(x)[None, :, :].expand(len(y), w, hidden)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)


def sincos_1d(n: int, dim: int, temperature: float = 10000.0, device: torch.device | None = None,
              start: int = 0) -> Tensor:
    """Transformer sin-cos positions of tokens start..start + n - 1: (n, dim), sines in the first half, cosines in
    the second."""
    if dim % 2:
        raise ValueError(f"sin-cos positions need an even dim, got {dim}")
    freqs = temperature ** (-torch.arange(dim // 2, dtype=torch.float32, device=device) / (dim // 2))
    angles = torch.arange(start, start + n, dtype=torch.float32, device=device)[:, None] * freqs
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def fourier_features(coords: Tensor, bands: int, max_freq: float) -> Tensor:
    """Perceiver-style features of coordinates in [-1, 1]: (..., D) -> (..., D * 2 * bands).

    Frequencies are spaced linearly from 1 to max_freq / 2 (the Nyquist rate of max_freq samples per unit).
    """
    freqs = torch.linspace(1.0, max_freq / 2, bands, device=coords.device, dtype=coords.dtype)
    angles = math.pi * coords[..., None] * freqs  # (..., D, bands)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).flatten(-2)
