"""Small building blocks shared by BiXT and the baselines."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bixt.nn.linear import Linear, linear


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        h = linear(x, self.fc1.weight, self.fc1.bias, gelu=True)  # GELU inside the product where it can be
        return self.drop(self.fc2(self.drop(h)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


# Rows (tokens, across the samples of a batch) per chunk for per-token work run without autograd on a CPU: the
# work's intermediates (chunk x 4 * dim floats, 3 MiB at dim 192) stay in cache instead of streaming 50 MiB tensors
# through memory, and sums land in place. Measured on 2 CPU cores (a token MLP with its LayerNorm, dim 192): 1.5x
# faster over 32 x 196 or 16,384 tokens, 1.25x over 1,024; results bit-identical. Not on a GPU: there each chunk is
# a handful of tiny kernel launches (BiXT-Ti's inference at 262,144 tokens on an H200 took 2.4x its training step
# with chunks).
TOKEN_CHUNK = 1024


def _row_chunks(*tensors: Tensor):
    """Matching (1, <= TOKEN_CHUNK, width) chunks of (B, N, width) tensors, all the batch's tokens as one run of
    rows (views of contiguous tensors; a non-contiguous one is chunked along N over all samples at once)."""
    rows = [t.view(1, -1, t.shape[-1]) if t.is_contiguous() else t for t in tensors]
    for start in range(0, rows[0].shape[1], TOKEN_CHUNK):
        yield tuple(r[:, start:start + TOKEN_CHUNK] for r in rows)


def add_per_token(x: Tensor, branch, training: bool, first: tuple[Tensor, Callable] | None = None) -> Tensor:
    """x + branch(x) for a branch that treats every token on its own (norm, MLP, layer scale).

    `first` = (y, f): first t = x + f(y) (f per token too: an output projection), then t + branch(t), in one
    sweep. In inference on a CPU (no autograd, module in eval) the sums are done chunk by chunk, in place: into `x`
    itself, which must then be a tensor the caller owns, or with `first` into a new tensor, so neither the
    projected update nor the sum before the branch ever exists whole (BiXT-Ti's inference on 2 cores, A/B in one
    process: 1.06-1.10x faster from 1,024 to 16,384 tokens on a Xeon and an AMD EPYC, 1.00-1.03x at 32 x 196).
    With autograd the plain sums are kept: in-place updates would clobber what backward needs, and drop-path must
    draw one mask per sample, not per chunk.
    Under torch.compile, `first` is summed whole (inductor fuses it).
    """
    if training or torch.is_grad_enabled() or x.device.type != "cpu" or (
            first is not None and torch.compiler.is_compiling()):
        if first is not None:
            x = x + first[1](first[0])
        return x + branch(x)
    if first is None:
        for (part,) in _row_chunks(x):
            part.add_(branch(part))
        return x
    y, f = first
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for part, x_part, y_part in _row_chunks(out, x.contiguous(), y.contiguous()):
        torch.add(x_part, f(y_part), out=part)
        part.add_(branch(part))
    return out


def split_heads(x: Tensor, parts: int, heads: int) -> tuple[Tensor, ...]:
    """(B, L, parts * heads * d) -> `parts` views (B, heads, L, d). Fused projections are laid out (parts, heads,
    head_dim) along features, as in the authors' code."""
    B, L, _ = x.shape
    return x.reshape(B, L, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def check_padding_mask(mask: Tensor | None, shape: tuple[int, int], need_a_token: bool = False) -> None:
    """A (B, N) bool padding mask (True marks padding) for `shape` = (B, N); with `need_a_token`, every sample must
    keep a real token (the latents' softmax over an all-padding sample would be empty)."""
    if mask is None:
        return
    if tuple(mask.shape) != tuple(shape) or mask.dtype != torch.bool:
        raise ValueError(f"padding_mask must be a (B, N) = {tuple(shape)} bool tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if need_a_token and mask.all(dim=1).any():
        raise ValueError("a sample in the batch is all padding: give every sample at least one token")


def scaled(dim: int, layerscale: float | None) -> nn.Module:
    return LayerScale(dim, layerscale) if layerscale else nn.Identity()


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth per block: linear from 0 at the first block to `rate` at the last (as timm)."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def classifier(dim: int, num_classes: int) -> nn.Module:
    """The classification head: Linear, or Identity for num_classes=0 (features only, as timm)."""
    return Linear(dim, num_classes) if num_classes else nn.Identity()
