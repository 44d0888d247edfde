"""Per-sample randomness and the tensor transforms: normalization, image and point-cloud augmentation, resizing.

Every random choice comes from `sample_rng(stream, seed, ..., sample index)`, never from a shared stream, so the
data a sample sees is the same whatever the number of processes, the batch split or the step a run resumed at.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bixt.data.shapes import random_rotation
from bixt.data.spec import check_memory

# Tags keeping the random streams apart: the first entry of every sample_rng key. Kept side by side so that a new
# stream cannot reuse one by accident.
AUGMENT_STREAM, CLOUD_STREAM, LISTOPS_STREAM = 0xA06, 0xC10D, 0x1157
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ImageAugment:
    """Random affine per image (rotation, scale, translation as a fraction of the side, optional h-flip),
    applied to a whole batch at once with affine_grid / grid_sample; the border fills with 0."""

    def __init__(self, degrees: float = 0.0, scale: float = 0.0, translate: float = 0.0, flip: bool = False):
        self.degrees, self.scale, self.translate, self.flip = degrees, scale, translate, flip

    def __call__(self, x: Tensor, rngs: Sequence[np.random.Generator]) -> Tensor:
        p = torch.tensor([[r.uniform(-self.degrees, self.degrees), r.uniform(1 - self.scale, 1 + self.scale),
                           r.uniform(-self.translate, self.translate), r.uniform(-self.translate, self.translate),
                           -1.0 if self.flip and r.random() < 0.5 else 1.0] for r in rngs], dtype=torch.float32)
        angle, zoom, tx, ty, flip = (torch.deg2rad(p[:, 0]), *p[:, 1:].unbind(1))
        cos, sin = angle.cos() / zoom, angle.sin() / zoom
        # theta maps output to input coordinates in [-1, 1]; translating by t of the side is 2t there.
        theta = torch.stack([torch.stack([cos * flip, -sin, -2 * tx], 1),
                             torch.stack([sin * flip, cos, -2 * ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class PointAugment:
    """Per cloud: optional random rotation, scale (per axis when `anisotropic`), translation, Gaussian jitter."""

    def __init__(self, rotate: bool = False, scale: tuple[float, float] = (1.0, 1.0), anisotropic: bool = False,
                 translate: float = 0.0, jitter: float = 0.0):
        self.rotate, self.scale, self.anisotropic = rotate, scale, anisotropic
        self.translate, self.jitter = translate, jitter

    def __call__(self, x: Tensor, rngs: Sequence[np.random.Generator]) -> Tensor:
        out = []
        for cloud, r in zip(x.numpy(), rngs, strict=True):
            xyz = cloud[:, :3] @ random_rotation(r).T if self.rotate else cloud[:, :3]
            xyz = xyz * r.uniform(*self.scale, size=3 if self.anisotropic else 1)
            xyz = xyz + r.uniform(-self.translate, self.translate, size=3)
            if self.jitter:
                xyz = xyz + r.normal(scale=self.jitter, size=xyz.shape)
            out.append(np.concatenate([xyz, cloud[:, 3:]], axis=1))
        return torch.from_numpy(np.stack(out).astype(np.float32))


def as_ids(x: Tensor) -> Tensor:
    return x.long()  # bytes are stored as uint8 (8x smaller) and embedded as int64 ids


def resize(x: Tensor, size: int | None) -> Tensor:
    """A batch of images (..., H, W) resized to size x size (bilinear, antialiased); unchanged when None or equal."""
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    # the resized copy in float32, and as much again for the antialiasing pass
    check_memory(f"{len(x)} images resized to img_size={size}", 8 * x[..., 0, 0].numel() * size * size,
                 "use a model with a smaller img_size")
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
