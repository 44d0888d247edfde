"""The splits a loader returns: tensors in memory (augmented a batch at a time), generated point clouds, image files.

Each split has an `epoch` attribute the training loop sets; with the split's seed and the sample index it keys the
sample's augmentation (see `bixt.data.transforms.sample_rng`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from bixt.data.readers import DataFileError
from bixt.data.shapes import SHAPES, make_shape
from bixt.data.transforms import AUGMENT_STREAM, CLOUD_STREAM, IMAGENET_MEAN, IMAGENET_STD, Normalize, sample_rng

CROP_PCT = 0.875  # eval: resize the short side to size / 0.875, centre-crop `size` (as the authors evaluate)


def _batched(batch):
    return batch  # __getitems__ already returns the collated batch


class TensorSplit(Dataset):
    """An in-memory split: `__getitems__` indexes whole batches, augments them, then normalizes."""

    collate = staticmethod(_batched)

    def __init__(self, x: Tensor, y: Tensor, augment: Callable | None = None, transform: Callable | None = None,
                 seed: int = 0):
        self.x, self.y, self.augment, self.transform, self.seed = x, y.long(), augment, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.y)

    def inputs(self, idx: list[int]) -> Tensor:
        return self.x[idx]

    def __getitems__(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        x = self.inputs(idx)
        if self.augment is not None:
            x = self.augment(x, [sample_rng(AUGMENT_STREAM, self.seed, self.epoch, i) for i in idx])
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[idx]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


class ShapesSplit(TensorSplit):
    """Procedural point clouds, generated when asked for: sample i is class i % 10, drawn from (seed, split, i)."""

    def __init__(self, size: int, points: int, data_seed: int, split: int, augment: Callable | None = None,
                 seed: int = 0):
        super().__init__(torch.empty(0), torch.arange(size) % len(SHAPES), augment, None, seed)
        self.points, self.data_seed, self.split = points, data_seed, split

    def inputs(self, idx: list[int]) -> Tensor:
        return torch.from_numpy(np.stack([make_shape(int(self.y[i]), self.points,
                                                     sample_rng(CLOUD_STREAM, self.data_seed, self.split, i))
                                          for i in idx]))


class ImageFolderSplit(Dataset):
    """Image files decoded with PIL. Train: random-resized crop (scale 0.08-1, ratio 3/4-4/3) and h-flip;
    eval: bicubic resize of the short side to size / 0.875 and a centre crop. ImageNet mean/std."""

    collate = staticmethod(default_collate)

    def __init__(self, files: list[Path], labels: list[int], size: int, train: bool, seed: int = 0):
        self.files, self.labels, self.size, self.train, self.seed = files, labels, size, train, seed
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB")
        except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error...
            raise DataFileError(f"{self.files[i]} is not a readable image ({type(e).__name__}: {e}): remove or "
                                "replace it") from None
        if self.train:
            im = self._random_crop(im, sample_rng(AUGMENT_STREAM, self.seed, self.epoch, i))
        else:
            im = self._center(im)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return self.normalize(x), self.labels[i]

    def _center(self, im):
        from PIL import Image

        w, h = im.size
        short = math.floor(self.size / CROP_PCT)
        # torchvision's Resize(int) on a PIL image, as timm's eval transform: the long side truncated.
        im = im.resize((short, int(short * h / w)) if w <= h else (int(short * w / h), short),
                       Image.Resampling.BICUBIC)
        w, h = im.size
        left, top = round((w - self.size) / 2), round((h - self.size) / 2)
        return im.crop((left, top, left + self.size, top + self.size))

    def _random_crop(self, im, rng: np.random.Generator):
        from PIL import Image

        w, h = im.size
        for _ in range(10):
            area = w * h * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                break
        else:  # fall back to the largest centred square
            cw = ch = min(w, h)
            left, top = (w - cw) // 2, (h - ch) // 2
        im = im.resize((self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


SUBSET_SEED = 0  # the samples a subset keeps: fixed, so every model and every seed of a comparison sees the same


class SubsetSplit(Dataset):
    """A fixed part of a split (`--train-samples` / `--test-samples`). Samples keep their index in the full split,
    so their augmentation is the full split's too."""

    def __init__(self, split: Dataset, indices: list[int]):
        self.split, self.indices = split, indices
        self.collate = getattr(split, "collate", default_collate)

    @property
    def epoch(self) -> int:
        return self.split.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.split.epoch = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.split[self.indices[i]]

    def __getitems__(self, idx: list[int]):
        full = [self.indices[i] for i in idx]
        if hasattr(self.split, "__getitems__"):
            return self.split.__getitems__(full)
        return [self.split[i] for i in full]


def take(split: Dataset, n: int | None, what: str) -> Dataset:
    """`n` samples of `split` drawn once by a fixed seed (in their original order); the whole split when n is None."""
    if n is None:
        return split
    if n > len(split):
        raise ValueError(f"--{what}-samples {n} is more than the {len(split)} {what} samples: use at most "
                         f"{len(split)}, or leave it out for all of them")
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n]
    return SubsetSplit(split, sorted(keep.tolist()))
