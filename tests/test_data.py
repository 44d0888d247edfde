"""Data specs, the built-in data sets, files on disk and the augmentation that must not depend on the batch split."""
import pickle
import sys

import numpy as np
import pytest
import torch

from bixt.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHAPES,
    DataSpec,
    ImageAugment,
    build_data,
    make_shape,
    parse_spec,
    sample_rng,
)


def test_parse_spec():
    assert parse_spec("digits") == DataSpec("digits")
    assert parse_spec("shapes:points=16384,train=10") == DataSpec("shapes", options={"points": 16384, "train": 10})
    assert parse_spec("imagefolder:/data/imnet").path.as_posix() == "/data/imnet"
    assert parse_spec("cifar10:x").kind == "cifar10"
    for bad, message in [("mnist", "unknown data spec 'mnist'"), ("cifar10", "needs a path"),
                         ("shapes:points=x", "bad shapes option"), ("shapes:colour=3", "bad shapes option"),
                         ("shapes:points=0", "shapes needs points >= 1, got 0"), ("digits:extra", "unknown data spec")]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)


def test_digits_fixed_stratified_split_and_normalized():
    a, b = build_data("digits", seed=0), build_data("digits", seed=7)
    assert (len(a.train), len(a.test)) == (1437, 360)  # 1797 images, 20 % held out
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)  # the split ignores the seed
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each digit
    x, _ = a.test.__getitems__(list(range(len(a.test))))
    assert x.shape == (360, 1, 8, 8) and abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1
    assert build_data("digits", img_size=16).test.x.shape[-2:] == (16, 16)


class FixedRng:
    """Stands in for a numpy Generator: uniform() returns the given values in order, random() a fixed draw."""

    def __init__(self, values, draw=0.9):
        self.values, self.draw = list(values), draw

    def uniform(self, lo, hi):
        return self.values.pop(0)

    def random(self):
        return self.draw


def test_image_augment_matches_exact_rotations_flips_and_shifts():
    x = torch.rand(1, 1, 8, 8)
    aug = ImageAugment(degrees=90, scale=0.5, translate=0.5, flip=True)
    same = aug(x, [FixedRng([0, 1, 0, 0], draw=0.9)])
    assert torch.allclose(same, x, atol=1e-6)
    flipped = aug(x, [FixedRng([0, 1, 0, 0], draw=0.1)])
    assert torch.allclose(flipped, x.flip(-1), atol=1e-6)
    # theta maps output to input coordinates: at +90 degrees output (x, y) reads input (-y, x), so output[r, c] is
    # input[c, W-1-r], which is torch.rot90 with k=1 (from the row axis toward the column axis)
    rotated = aug(x, [FixedRng([90, 1, 0, 0])])
    assert torch.allclose(rotated, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    shifted = aug(x, [FixedRng([0, 1, 1 / 8, 0])])  # one pixel to the right, zeros come in
    expected = torch.zeros_like(x)
    expected[..., 1:] = x[..., :-1]
    assert torch.allclose(shifted, expected, atol=1e-6)


def test_augmentation_depends_on_sample_and_epoch_not_on_batch():
    data = build_data("digits", seed=3)
    together, _ = data.train.__getitems__([4, 9, 11])
    alone, _ = data.train.__getitems__([9])
    assert torch.equal(together[1], alone[0])
    data.train.epoch = 1
    later, _ = data.train.__getitems__([9])
    assert not torch.equal(later, alone)
    assert not torch.equal(build_data("digits", seed=4).train.__getitems__([9])[0], alone)


def test_shapes_deterministic_configurable_and_learnable():
    a = build_data("shapes:points=128,train=40,test=20,seed=1")
    b = build_data("shapes:points=128,train=40,test=20,seed=1")
    c = build_data("shapes:points=128,train=40,test=20,seed=2")
    xa, ya = a.test.__getitems__(list(range(20)))
    assert a.num_classes == len(SHAPES) >= 8 and torch.equal(ya, torch.arange(20) % 10)
    assert torch.equal(xa, b.test.__getitems__(list(range(20)))[0])  # same seed, same data
    assert not torch.equal(xa, c.test.__getitems__(list(range(20)))[0])
    assert xa.shape == (20, 128, 3) and xa.norm(dim=-1).max() < 1.1
    big = make_shape(3, 16384, sample_rng(0))
    assert big.shape == (16384, 3) and np.isfinite(big).all()
    # The classes are separable from pose-free statistics alone (sorted radii, PCA spectrum): 1-NN on them
    # beats chance (10 %) by far, so the generator makes distinct shapes, not noise.
    def features(seed, n):
        out, labels = [], []
        for i in range(n):
            p = make_shape(i % 10, 256, sample_rng(seed, i)).astype(np.float64)
            p -= p.mean(0)
            r = np.linalg.norm(p, axis=1)
            eig = np.sort(np.linalg.eigvalsh(np.cov(p.T)))
            out.append(np.concatenate([np.quantile(r / r.max(), np.linspace(0, 1, 16)), eig / eig.sum()]))
            labels.append(i % 10)
        return np.array(out), np.array(labels)
    ftr, ltr = features(10, 300)
    fte, lte = features(11, 100)
    nearest = ((fte[:, None] - ftr[None]) ** 2).sum(-1).argmin(1)
    assert (ltr[nearest] == lte).mean() > 0.6


def _png(path, size, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_eval_transform_and_errors(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / split / "cat" / "a.png", (256, 256), (255, 0, 0))
        _png(tmp_path / split / "dog" / "b.png", (300, 200), (0, 128, 255))
    data = build_data(f"imagefolder:{tmp_path}", img_size=224)
    assert data.classes == ["cat", "dog"] and data.num_classes == 2 and data.in_chans == 3
    x, label = data.test[0]
    assert x.shape == (3, 224, 224) and label == 0
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-5)
    x, label = data.train[1]  # random-resized crop of the 300 x 200 image: any crop of a flat colour
    assert x.shape == (3, 224, 224) and label == 1
    assert torch.equal(data.train[1][0], x)  # same (seed, epoch, index), same crop
    with pytest.raises(FileNotFoundError, match="expected a folder with train/<class>/ and val/<class>/ subfolders"):
        build_data(f"imagefolder:{tmp_path / 'nope'}")
    _png(tmp_path / "train" / "eel" / "c.png", (10, 10), (0, 0, 0))
    with pytest.raises(ValueError, match="different class folders"):
        build_data(f"imagefolder:{tmp_path}")
    (tmp_path / "val" / "eel").mkdir()
    (tmp_path / "val" / "eel" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        build_data(f"imagefolder:{tmp_path}").test[2]


def _cifar(root, n=6, protocol=2):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


class _Evil:
    """Unpickled, it would touch `marker`: the file existing afterwards means the pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        import shlex

        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_cifar_batches_and_a_malicious_batch_runs_no_code(tmp_path):
    root = _cifar(tmp_path / "cifar-10-batches-py")
    data = build_data(f"cifar10:{tmp_path}", img_size=32)  # the parent folder is accepted too
    assert len(data.train) == 30 and len(data.test) == 6 and data.classes[3] == "c3"
    raw = pickle.loads((root / "test_batch").read_bytes())[b"data"][2].reshape(3, 32, 32) / 255.0
    assert torch.allclose(data.test.x[2], torch.from_numpy(raw).float())
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Evil(armed)))  # plain pickle runs the payload, so the marker check below can fail
    assert armed.exists()
    marker = tmp_path / "pwned"
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}))
    with pytest.raises(ValueError, match="refused global"):
        build_data(f"cifar10:{root}")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="python-batches layout"):
        build_data(f"cifar100:{root}")


def test_modelnet40_hdf5(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    for name, n in [("ply_data_train0.h5", 8), ("ply_data_test0.h5", 4)]:
        with h5py.File(tmp_path / name, "w") as f:
            f["data"] = rng.uniform(-1, 1, (n, 2048, 3)).astype(np.float32)
            f["label"] = (np.arange(n) % 40).reshape(n, 1).astype(np.uint8)
    data = build_data(f"modelnet40:{tmp_path}", points=1024)
    assert data.modality == "points" and data.num_classes == 40 and data.test.x.shape == (4, 1024, 3)
    with h5py.File(tmp_path / "ply_data_test0.h5") as f:
        assert np.array_equal(data.test.x[1].numpy(), f["data"][1, :1024])  # the first N points, as PointNet
    with pytest.raises(ValueError, match="holds 2048 points per cloud"):
        build_data(f"modelnet40:{tmp_path}", points=4096)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*train\*.h5 files"):
        build_data(f"modelnet40:{tmp_path / 'empty'}")
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if the optional extra were not installed
    with pytest.raises(ValueError, match=r"pip install 'bixt\[modelnet40\]'"):
        build_data(f"modelnet40:{tmp_path}")

