"""Procedural point clouds: 10 shape classes with random pose, scale, non-uniform sampling and noise.

`make_shape(label, points, rng)` draws one cloud from a numpy Generator; the same generator state gives the same
cloud, at any number of points (16,384 and beyond). `bixt.data` serves them as the `shapes` data set.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix with the signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _sphere(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _ellipsoid(rng, n):
    return _sphere(rng, n) * np.array([1.0, 0.6, 0.35])


def _cube(rng, n):
    p = rng.uniform(-1, 1, size=(n, 3))
    axis = rng.integers(3, size=n)
    p[np.arange(n), axis] = rng.choice([-1.0, 1.0], size=n)
    return p


def _cylinder(rng, n, radius=0.55):
    caps = rng.random(n) < radius / (radius + 2.0)  # cap area / total area for height 2
    theta = rng.uniform(0, 2 * np.pi, n)
    rad = np.where(caps, radius * np.sqrt(rng.random(n)), radius)
    z = np.where(caps, rng.choice([-1.0, 1.0], size=n), rng.uniform(-1, 1, n))
    return np.stack([rad * np.cos(theta), rad * np.sin(theta), z], 1)


def _cone(rng, n, radius=0.8):
    base = rng.random(n) < 0.3
    theta = rng.uniform(0, 2 * np.pi, n)
    t = np.sqrt(rng.random(n))  # area-uniform: the slant surface grows linearly away from the apex
    rad = radius * t
    z = np.where(base, -1.0, 1.0 - 2.0 * t)
    return np.stack([rad * np.cos(theta), rad * np.sin(theta), z], 1)


def _torus(rng, n, major=0.7, minor=0.28):
    u, v = rng.uniform(0, 2 * np.pi, (2, n))
    ring = major + minor * np.cos(v)
    return np.stack([ring * np.cos(u), ring * np.sin(u), minor * np.sin(v)], 1)


def _triangles(rng, n, tris):
    tris = np.asarray(tris, dtype=np.float64)  # (T, 3 corners, 3)
    area = np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
    t = tris[rng.choice(len(tris), size=n, p=area / area.sum())]
    a, b = rng.random((2, n, 1))
    flip = (a + b) > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    return t[:, 0] + a * (t[:, 1] - t[:, 0]) + b * (t[:, 2] - t[:, 0])


_SQUARE = np.array([[-1, -1, -0.8], [1, -1, -0.8], [1, 1, -0.8], [-1, 1, -0.8]], dtype=np.float64)
_APEX = np.array([0.0, 0.0, 1.0])


def _pyramid(rng, n):
    sides = [[_SQUARE[i], _SQUARE[(i + 1) % 4], _APEX] for i in range(4)]
    return _triangles(rng, n, sides + [_SQUARE[[0, 1, 2]], _SQUARE[[0, 2, 3]]])


def _ring(rng, n, inner=0.5):
    theta = rng.uniform(0, 2 * np.pi, n)
    rad = np.sqrt(rng.uniform(inner**2, 1.0, n))
    return np.stack([rad * np.cos(theta), rad * np.sin(theta), rng.normal(scale=0.03, size=n)], 1)


def _helix(rng, n, turns=2.5):
    t = rng.uniform(0, 2 * np.pi * turns, n)
    tube = rng.normal(scale=0.06, size=(n, 3))
    return np.stack([0.6 * np.cos(t), 0.6 * np.sin(t), t / (np.pi * turns) - 1.0], 1) + tube


def _dumbbell(rng, n):
    return _sphere(rng, n) * 0.45 + np.where(rng.random((n, 1)) < 0.5, -1.0, 1.0) * np.array([0.0, 0.0, 0.55])


SHAPES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "sphere": _sphere, "ellipsoid": _ellipsoid, "cube": _cube, "cylinder": _cylinder, "cone": _cone,
    "torus": _torus, "pyramid": _pyramid, "ring": _ring, "helix": _helix, "dumbbell": _dumbbell,
}


def make_shape(label: int, points: int, rng: np.random.Generator) -> np.ndarray:
    """One cloud (points, 3) of class `label` inside the unit ball: random pose, scale and offset, sampled
    non-uniformly (denser towards a random direction), with Gaussian noise."""
    cand = list(SHAPES.values())[label](rng, 2 * points)
    cand /= np.linalg.norm(cand, axis=1).max()
    # Gumbel top-k: `points` of the candidates without replacement, with probability ~ exp(k <p, d>).
    k, d = rng.uniform(0, 3), _sphere(rng, 1)[0]
    keys = k * (cand @ d) + rng.gumbel(size=len(cand))
    cloud = cand[np.argpartition(-keys, points - 1)[:points]]
    rng.shuffle(cloud)
    cloud = cloud @ random_rotation(rng).T * rng.uniform(0.5, 0.85) + rng.uniform(-0.1, 0.1, size=3)
    return (cloud + rng.normal(scale=rng.uniform(0.0, 0.02), size=cloud.shape)).astype(np.float32)
