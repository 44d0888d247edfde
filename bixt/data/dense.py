"""Dense (per-token) data: procedural part-labelled point clouds and segmentation scenes, and their splits.

`make_part_shape(category, points, rng)` draws one object built from named parts (a table's top and legs...) with a
part id per point; `make_scene(size, rng)` draws an image of textured shapes over a textured background with a
class per pixel. Both draw everything from the numpy Generator they are given, so a sample is fixed by the key of
its generator, (stream, data seed, split, index), whatever the number of processes. `bixt.data` serves them as the
`partshapes` and `segscenes` data sets; `SegFolderSplit` serves image/label-map files (ADE20K's layout).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bixt.data.readers import DataFileError
from bixt.data.shapes import random_rotation
from bixt.data.transforms import AUGMENT_STREAM, IMAGENET_MEAN, IMAGENET_STD, Normalize, sample_rng

# sample_rng stream tags of the dense sets, apart from transforms' (AUGMENT, CLOUD, LISTOPS): tests check they differ
PART_STREAM, SCENE_STREAM = 0x9A27, 0x5CE7

# ----------------------------------------------------------------------------------------------------- parts
# category -> its parts, in global part-id order (the ids run on across categories, as ShapeNetPart's do)
PART_CATEGORIES: dict[str, tuple[str, ...]] = {
    "dumbbell": ("ball", "bar"),
    "table": ("top", "leg"),
    "lamp": ("base", "stem", "shade"),
    "mug": ("body", "handle"),
    "chair": ("seat", "back", "leg"),
    "rocket": ("body", "nose", "fin"),
}
PART_NAMES = [f"{c}_{p}" for c, parts in PART_CATEGORIES.items() for p in parts]
_offsets = np.cumsum([0] + [len(p) for p in PART_CATEGORIES.values()])
CATEGORY_PARTS = tuple(tuple(range(a, b)) for a, b in zip(_offsets[:-1], _offsets[1:], strict=True))


def _box(rng, n, d):
    # surface of a box with half-extents d: a face chosen by its area, then a uniform point on it
    area = np.array([d[1] * d[2], d[0] * d[2], d[0] * d[1]])
    axis = rng.choice(3, size=n, p=area / area.sum())
    p = rng.uniform(-1, 1, size=(n, 3))
    p[np.arange(n), axis] = rng.choice([-1.0, 1.0], size=n)
    return p * d


def _cylinder(rng, n, d):  # d = (radius, radius, half height), axis z, with caps
    r, h = d[0], d[2]
    caps = rng.random(n) < r / (r + 2 * h)
    theta = rng.uniform(0, 2 * np.pi, n)
    rad = np.where(caps, r * np.sqrt(rng.random(n)), r)
    z = np.where(caps, rng.choice([-h, h], size=n), rng.uniform(-h, h, n))
    return np.stack([rad * np.cos(theta), rad * np.sin(theta), z], 1)


def _ball(rng, n, d):  # an ellipsoid with radii d
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True) * d


def _cone(rng, n, d):  # d = (bottom radius, top radius, half height): a frustum's side, open
    t = rng.random(n)
    theta = rng.uniform(0, 2 * np.pi, n)
    rad = d[0] + (d[1] - d[0]) * t
    return np.stack([rad * np.cos(theta), rad * np.sin(theta), d[2] * (2 * t - 1)], 1)


def _handle(rng, n, d):  # d = (major, minor, _): the outer half of a torus in the xz plane
    u, v = rng.uniform(-np.pi / 2, np.pi / 2, n), rng.uniform(0, 2 * np.pi, n)
    ring = d[0] + d[1] * np.cos(v)
    return np.stack([ring * np.cos(u), d[1] * np.sin(v), ring * np.sin(u)], 1)


def _area(kind, d):  # rough surface areas: they only share the points out between primitives
    if kind is _box:
        return 8 * (d[0] * d[1] + d[1] * d[2] + d[0] * d[2])
    if kind is _cylinder:
        return 2 * np.pi * d[0] * (2 * d[2] + d[0])
    if kind is _ball:
        return 4 * np.pi * (((d[0] * d[1]) ** 1.6 + (d[0] * d[2]) ** 1.6 + (d[1] * d[2]) ** 1.6) / 3) ** (1 / 1.6)
    if kind is _cone:
        return np.pi * (d[0] + d[1]) * np.hypot(d[0] - d[1], 2 * d[2])
    return 2 * np.pi**2 * d[0] * d[1]


# A primitive: (local part, sampler, its dims, the centres of its copies).
Primitive = tuple[int, Callable, tuple, list]


def _dumbbell(u) -> list[Primitive]:
    r, half = u(0.3, 0.45), u(0.55, 0.9)
    return [(0, _ball, (r, r, r * u(0.8, 1.0)), [(0, 0, -half), (0, 0, half)]),
            (1, _cylinder, (u(0.05, 0.12),) * 2 + (half,), [(0, 0, 0)])]


def _table(u) -> list[Primitive]:
    a, b, h, r = u(0.6, 1.0), u(0.35, 0.8), u(0.45, 0.9), u(0.03, 0.07)
    legs = [(sx * (a - 2 * r), sy * (b - 2 * r), h / 2) for sx in (-1, 1) for sy in (-1, 1)]
    return [(0, _box, (a, b, u(0.02, 0.06)), [(0, 0, h)]), (1, _cylinder, (r, r, h / 2), legs)]


def _lamp(u) -> list[Primitive]:
    stem, shade = u(0.7, 1.3), u(0.15, 0.3)
    return [(0, _cylinder, (u(0.2, 0.4),) * 2 + (u(0.03, 0.06),), [(0, 0, 0)]),
            (1, _cylinder, (u(0.02, 0.05),) * 2 + (stem / 2,), [(0, 0, stem / 2)]),
            (2, _cone, (u(0.3, 0.5), u(0.08, 0.25), shade), [(0, 0, stem + shade * 0.5)])]


def _mug(u) -> list[Primitive]:
    r, h = u(0.3, 0.5), u(0.35, 0.6)
    return [(0, _cylinder, (r, r, h), [(0, 0, 0)]), (1, _handle, (u(0.15, 0.3), u(0.03, 0.06), 0), [(r, 0, 0)])]


def _chair(u) -> list[Primitive]:
    a, b, seat, back, r = u(0.35, 0.55), u(0.35, 0.55), u(0.4, 0.7), u(0.3, 0.6), u(0.025, 0.05)
    legs = [(sx * (a - r), sy * (b - r), seat / 2) for sx in (-1, 1) for sy in (-1, 1)]
    return [(0, _box, (a, b, u(0.025, 0.05)), [(0, 0, seat)]),
            (1, _box, (a, u(0.02, 0.05), back), [(0, -b, seat + back)]),
            (2, _cylinder, (r, r, seat / 2), legs)]


def _rocket(u) -> list[Primitive]:
    r, h, nose, fw, fh = u(0.12, 0.25), u(0.6, 0.9), u(0.2, 0.4), u(0.1, 0.2), u(0.15, 0.3)
    x, y = (r + fw, 0, fh - h), (0, r + fw, fh - h)
    return [(0, _cylinder, (r, r, h), [(0, 0, 0)]), (1, _cone, (r, 0.0, nose), [(0, 0, h + nose)]),
            (2, _box, (fw, 0.012, fh), [x, (-x[0], 0, x[2])]), (2, _box, (0.012, fw, fh), [y, (0, -y[1], y[2])])]


_BUILD = dict(zip(PART_CATEGORIES, (_dumbbell, _table, _lamp, _mug, _chair, _rocket), strict=True))


def make_part_shape(category: int, points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One object of `category` (an index into PART_CATEGORIES): points (points, 3) float32 inside the unit ball and
    their global part ids (points,) int64. Random part proportions, each part sampled at its own random density,
    then a random non-uniform scale, rotation, size, offset and noise."""
    prims = _BUILD[list(PART_CATEGORIES)[category]](rng.uniform)
    # every part sampled at its own density: a part's share of points is its area times a factor of up to e^+-1
    weight = np.array([_area(k, d) * len(c) for _, k, d, c in prims]) * np.exp(rng.uniform(-1, 1, len(prims)))
    counts = rng.multinomial(points, weight / weight.sum())
    clouds, labels = [], []
    for (part, kind, dims, centres), n in zip(prims, counts, strict=True):
        if n:
            c = np.asarray(centres, dtype=np.float64)
            clouds.append(kind(rng, n, np.asarray(dims)) + c[rng.integers(len(c), size=n)])
            labels.append(np.full(n, CATEGORY_PARTS[category][part], dtype=np.int64))
    cloud, label = np.concatenate(clouds), np.concatenate(labels)
    order = rng.permutation(points)  # parts not in runs: a model must not learn labels from positions in the array
    cloud, label = cloud[order], label[order]
    cloud = (cloud - (cloud.max(0) + cloud.min(0)) / 2) * rng.uniform(0.75, 1.25, size=3)
    cloud = cloud @ random_rotation(rng).T
    cloud *= rng.uniform(0.6, 0.9) / max(np.linalg.norm(cloud, axis=1).max(), 1e-9)  # 1 point: the origin
    cloud += rng.uniform(-0.05, 0.05, size=3) + rng.normal(scale=rng.uniform(0.0, 0.01), size=cloud.shape)
    return cloud.astype(np.float32), label


# ----------------------------------------------------------------------------------------------------- scenes
# class -> its texture; disc and striped_disc share an outline, so only the texture tells them apart
SCENE_CLASSES = ("background", "disc", "striped_disc", "square", "triangle", "ring")
SCENE_TEXTURES = {"disc": "flat", "striped_disc": "stripes", "square": "checker", "triangle": "speckle",
                  "ring": "flat"}
# fixed, not measured: every colour is uniform in [0, 1] (mean 0.5, std ~0.29)
SCENE_NORMALIZE = Normalize((0.5, 0.5, 0.5), (0.29, 0.29, 0.29))


def _texture(kind: str, rng, xx, yy) -> np.ndarray:
    """(3, S, S) colours in [0, 1]; periods are fractions of the side (2-4 pixels at size 32), so a scene looks
    the same at every resolution and a coarse token grid blurs the stripes and checks away."""
    c1, c2 = rng.random(3), rng.random(3)
    if kind == "flat":
        pick = np.zeros_like(xx, dtype=bool)
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        pick = ((xx * np.cos(angle) + yy * np.sin(angle)) / rng.uniform(2, 4) * 32 + rng.random()) % 1 < 0.5
    elif kind == "checker":
        cell = rng.uniform(2, 4) / 32
        pick = (np.floor(xx / cell) + np.floor(yy / cell)) % 2 == 1
    else:  # speckle
        pick = rng.random(xx.shape) < 0.5
    return np.where(pick, c2[:, None, None], c1[:, None, None])


def _mask(kind: str, rng, xx, yy) -> np.ndarray:
    cx, cy, r, angle = *rng.uniform(0.1, 0.9, 2), rng.uniform(0.06, 0.3), rng.uniform(0, 2 * np.pi)
    dx, dy = xx - cx, yy - cy
    if kind in ("disc", "striped_disc"):
        return dx**2 + dy**2 <= r**2
    if kind == "ring":
        return (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r) ** 2)
    if kind == "square":
        u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
        return np.maximum(abs(u), abs(v)) <= 0.8 * r
    normals = angle + 2 * np.pi * np.arange(3)[:, None, None] / 3  # triangle: inside three half-planes
    return ((dx * np.cos(normals) + dy * np.sin(normals)) <= r / 2).all(0)


def scene_layers(size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
    """A scene's background (3, S, S) and its shapes in drawing order, each (class, mask (S, S), texture)."""
    yy, xx = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    # background: a colour gradient under faint speckle, textured but unlike any shape's texture
    c1, c2 = rng.random(3), rng.random(3)
    t = xx * np.cos(a := rng.uniform(0, 2 * np.pi)) + yy * np.sin(a)
    bg = np.clip(c1[:, None, None] + 0.3 * (c2 - c1)[:, None, None] * t + rng.normal(0, 0.06, (3, size, size)), 0, 1)
    layers = []
    for _ in range(rng.integers(2, 7)):
        cls = int(rng.integers(1, len(SCENE_CLASSES)))
        name = SCENE_CLASSES[cls]
        layers.append((cls, _mask(name, rng, xx, yy), _texture(SCENE_TEXTURES[name], rng, xx, yy)))
    return bg, layers


def make_scene(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: the image (3, size, size) float32 in [0, 1] and its classes (size, size) int64. Later shapes
    overwrite earlier ones (occlusion); there are no void pixels (the masks are hard, so no pixel is ambiguous)."""
    img, layers = scene_layers(size, rng)
    label = np.zeros((size, size), dtype=np.int64)
    for cls, mask, tex in layers:
        img = np.where(mask, tex, img)
        label[mask] = cls
    return img.astype(np.float32), label


# ----------------------------------------------------------------------------------------------------- splits
def _batched(batch):
    return batch  # __getitems__ already returns the collated batch


class PartShapesSplit(Dataset):
    """Part-labelled clouds generated when asked for: sample i is category i % 6, drawn from (seed, split, i);
    the augmentation (positions only, the labels stay) from (training seed, epoch, i). Samples (x (N, 3), y (N,))."""

    collate = staticmethod(_batched)

    def __init__(self, size: int, points: int, data_seed: int, split: int, augment: Callable | None = None,
                 seed: int = 0):
        self.size, self.points, self.data_seed, self.split = size, points, data_seed, split
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self) -> int:
        return self.size

    def __getitems__(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        pairs = [make_part_shape(i % len(PART_CATEGORIES), self.points,
                                 sample_rng(PART_STREAM, self.data_seed, self.split, i)) for i in idx]
        x, y = torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs]))
        if self.augment is not None:
            x = self.augment(x, [sample_rng(AUGMENT_STREAM, self.seed, self.epoch, i) for i in idx])
        return x, y

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


def _flip(x: Tensor, y: Tensor, flips: list[bool]) -> tuple[Tensor, Tensor]:
    # a mirrored scene is still a scene: image and labels flipped together
    f = torch.tensor(flips)
    return torch.where(f[:, None, None, None], x.flip(-1), x), torch.where(f[:, None, None], y.flip(-1), y)


class SegScenesSplit(Dataset):
    """Scenes generated when asked for, drawn from (seed, split, i); training flips from (training seed, epoch, i).
    Samples (x (3, S, S) normalized, y (S, S))."""

    collate = staticmethod(_batched)

    def __init__(self, size: int, img_size: int, data_seed: int, split: int, flip: bool = False, seed: int = 0):
        self.size, self.img_size, self.data_seed, self.split = size, img_size, data_seed, split
        self.flip, self.seed, self.epoch = flip, seed, 0

    def __len__(self) -> int:
        return self.size

    def __getitems__(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        pairs = [make_scene(self.img_size, sample_rng(SCENE_STREAM, self.data_seed, self.split, i)) for i in idx]
        x, y = torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs]))
        if self.flip:
            x, y = _flip(x, y, [sample_rng(AUGMENT_STREAM, self.seed, self.epoch, i).random() < 0.5 for i in idx])
        return SCENE_NORMALIZE(x), y

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


class SegFolderSplit(Dataset):
    """Image and label-map files (ADE20K's layout) decoded with PIL, one pair per sample (DataLoader workers help):
    the image resized bilinearly and the labels by nearest neighbour to size x size; label 0 (void) becomes
    `ignore_index` and label k class k - 1. Training flips from (training seed, epoch, i). ImageNet mean/std."""

    def __init__(self, images: list[Path], labels: list[Path], size: int, num_classes: int, ignore_index: int,
                 flip: bool = False, seed: int = 0):
        self.images, self.labels, self.size, self.num_classes = images, labels, size, num_classes
        self.ignore_index, self.flip, self.seed, self.epoch = ignore_index, flip, seed, 0
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.images)

    def _open(self, path: Path, mode: str | None):
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert(mode) if mode else im.copy()
        except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error...
            raise DataFileError(f"{path} is not a readable image ({type(e).__name__}: {e}): remove or replace "
                                "it") from None
        return im

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        im, lab = self._open(self.images[i], "RGB"), self._open(self.labels[i], None)
        if lab.mode not in ("L", "P", "I", "I;16"):
            raise DataFileError(f"{self.labels[i]} is a {lab.mode} image, not a label map: give single-channel "
                                "PNGs of class indices (0 = void)")
        im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
        lab = np.asarray(lab.resize((self.size, self.size), Image.Resampling.NEAREST), dtype=np.int64)
        if lab.max() > self.num_classes:
            raise DataFileError(f"{self.labels[i]} has label {lab.max()} but the data has {self.num_classes} classes: "
                                "list every class in objectInfo150.csv")
        y = torch.from_numpy(np.where(lab == 0, self.ignore_index, lab - 1))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.flip and sample_rng(AUGMENT_STREAM, self.seed, self.epoch, i).random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return self.normalize(x), y
