"""Dense data: the procedural part clouds and scenes, the ShapeNetPart and ADE20K readers, the dense conventions."""
import time

import numpy as np
import pytest
import torch

from bixt.data import (
    CATEGORY_PARTS,
    PART_CATEGORIES,
    PART_NAMES,
    SCENE_CLASSES,
    SHAPENETPART_PARTS,
    SPECS,
    DataFileError,
    DataSpec,
    build_data,
    category_of,
    check_category_parts,
    dense,
    make_part_shape,
    parse_spec,
    readers,
    sample_rng,
    transforms,
)
from bixt.data.dense import scene_layers


def test_specs_usage_and_streams():
    for line in ("partshapes[:points=N,train=N,test=N,seed=N]", "segscenes[:size=N,train=N,test=N,seed=N]",
                 "shapenetpart:PATH", "ade20k:PATH"):
        assert line in SPECS
    assert parse_spec("partshapes:points=100,seed=0") == DataSpec("partshapes", options={"points": 100, "seed": 0})
    assert parse_spec("segscenes:size=64").options == {"size": 64}
    for bad, message in [("segscenes:colour=1", "bad segscenes option"), ("partshapes:points=0", "points >= 1"),
                         ("shapenetpart", "needs a path"), ("ade20k", "needs a path")]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)
    tags = [transforms.AUGMENT_STREAM, transforms.CLOUD_STREAM, transforms.LISTOPS_STREAM, dense.PART_STREAM,
            dense.SCENE_STREAM, readers.SUBSET_STREAM]
    assert len(set(tags)) == len(tags)  # a shared tag would correlate two data sets' randomness


def test_category_of_and_table_checks():
    parts = ((0, 1), (2, 3, 4))
    assert int(category_of(torch.tensor([-100, 3, 2]), parts)) == 1
    assert category_of(torch.tensor([[1, 0], [-100, -100], [4, 4]]), parts).tolist() == [0, -1, 1]
    check_category_parts(parts, 5)
    with pytest.raises(ValueError, match="part 1 belongs to 2 categories"):
        check_category_parts(((0, 1), (1, 2)), 3)
    with pytest.raises(ValueError, match="part 2 belongs to 0 categories"):
        check_category_parts(((0, 1),), 3)
    check_category_parts(tuple(SHAPENETPART_PARTS.values()), 50)
    assert len(SHAPENETPART_PARTS) == 16 and SHAPENETPART_PARTS["Table"] == (47, 48, 49)


def test_partshapes_labels_shapes_and_determinism():
    data = build_data("partshapes:train=12,test=12,points=300")
    assert (data.task, data.num_classes, data.classes, data.modality) == ("segment", 15, PART_NAMES, "points")
    assert len(PART_CATEGORIES) >= 4 and data.category_parts == CATEGORY_PARTS
    check_category_parts(CATEGORY_PARTS, data.num_classes)
    assert data.input_overrides == {"num_classes": 0, "dense_classes": 15, "in_chans": 3}
    x, y = data.test.__getitems__(list(range(12)))
    assert x.shape == (12, 300, 3) and x.dtype == torch.float32 and y.shape == (12, 300) and y.dtype == torch.int64
    assert x.norm(dim=-1).max() <= 1.0 and torch.isfinite(x).all()
    cats = torch.arange(12) % len(PART_CATEGORIES)
    assert torch.equal(category_of(y, CATEGORY_PARTS), cats)
    for label, c in zip(y, cats, strict=True):
        assert set(label.tolist()) <= set(CATEGORY_PARTS[c])  # every point's part belongs to the sample's category
    assert set(y.unique().tolist()) == set(range(15))  # every part appears
    again = build_data("partshapes:train=12,test=12,points=300", seed=9, augment=False)
    x2, y2 = again.test.__getitems__(list(range(12)))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # the data ignore the training seed
    x3, _ = build_data("partshapes:test=12,points=300,seed=1").test.__getitems__(list(range(12)))
    assert not torch.allclose(x, x3)
    tr = build_data("partshapes:train=4,test=1,points=300", seed=3).train
    xa, ya = tr.__getitems__([0, 1])
    tr.epoch = 1
    xb, yb = tr.__getitems__([0, 1])
    assert torch.equal(ya, yb) and not torch.allclose(xa, xb)  # augmentation moves points, keeps their labels
    assert torch.equal(tr[1][0], xb[1])
    # any number of points, and the points of one sample are not in runs of one part
    _, big = make_part_shape(4, 5000, sample_rng(0))
    assert big.shape == (5000,) and (big[1:] != big[:-1]).mean() > 0.2
    assert make_part_shape(0, 1, sample_rng(0))[0].shape == (1, 3)


def test_partshapes_generation_is_fast():
    start = time.perf_counter()
    for i in range(2000):
        make_part_shape(i % 6, 1024, sample_rng(dense.PART_STREAM, 0, 0, i))
    assert time.perf_counter() - start < 6  # ~1 s on one core; loose, the test machines are shared


def test_segscenes_shapes_classes_occlusion_and_flips():
    data = build_data("segscenes:train=8,test=40")
    assert (data.num_classes, data.in_chans, data.classes) == (6, 3, list(SCENE_CLASSES))
    assert data.input_overrides == {"num_classes": 0, "dense_classes": 6, "in_chans": 3}
    x, y = data.test.__getitems__(list(range(40)))
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (40, 32, 32)
    assert y.dtype == torch.int64 and y.min() == 0 and y.max() <= 5
    assert abs(x.mean().item()) < 0.5 and 0.6 < x.std().item() < 1.5  # normalized
    assert set(y.unique().tolist()) == set(range(6))
    x2, y2 = build_data("segscenes:train=8,test=40", seed=5).test.__getitems__(list(range(40)))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(y, build_data("segscenes:test=40,seed=1").test.__getitems__(list(range(40)))[1])
    assert build_data("segscenes:size=48,test=2").test[0][1].shape == (48, 48)
    assert build_data("segscenes:test=2", img_size=16).test[0][0].shape == (3, 16, 16)
    # occlusion: a later shape covers part of an earlier one, and the label is the later one's
    occluded = 0
    for i in range(30):
        rng = sample_rng(dense.SCENE_STREAM, 0, 1, i)
        _, layers = scene_layers(32, rng)
        _, label = dense.make_scene(32, sample_rng(dense.SCENE_STREAM, 0, 1, i))
        for j, (_, mask, _) in enumerate(layers):
            for _, later, _ in layers[j + 1:]:
                occluded += int((mask & later).sum())
        top = np.zeros_like(label)
        for cls, mask, _ in layers:
            top[mask] = cls
        assert np.array_equal(top, label)
    assert occluded > 0
    # texture matters: striped discs are two-coloured, flat discs one colour (in the raw image)
    img, lab = dense.make_scene(64, sample_rng(7))
    for cls, mask, tex in scene_layers(64, sample_rng(7))[1]:
        colours = len(np.unique(tex[:, mask].T, axis=0)) if mask.any() else 0
        if SCENE_CLASSES[cls] == "disc":
            assert colours == 1
        if SCENE_CLASSES[cls] == "striped_disc" and mask.sum() > 30:
            assert colours == 2
    # training flips move image and labels together
    tr = build_data("segscenes:train=16,test=1", seed=1).train
    plain = build_data("segscenes:train=16,test=1", augment=False).train
    xa, ya = tr.__getitems__(list(range(16)))
    xp, yp = plain.__getitems__(list(range(16)))
    flipped = [not torch.equal(ya[i], yp[i]) for i in range(16)]
    assert any(flipped)
    for i in range(16):
        f = (lambda t: t.flip(-1)) if flipped[i] else (lambda t: t)
        assert torch.equal(ya[i], f(yp[i])) and torch.equal(xa[i], f(xp[i]))


def test_default_models_build_with_dense_heads():
    from bixt.data import DEFAULT_MODELS
    from bixt.models.registry import get_entry, model_config

    for kind, shape in (("partshapes", (2, 1024, 3)), ("segscenes", (2, 3, 32, 32))):
        name, args = DEFAULT_MODELS[kind]
        data = build_data(f"{kind}:train=2,test=2", need_train=False)
        model = get_entry(name).build(model_config(name, **{**args, **data.input_overrides}))
        out = model(torch.randn(shape))
        assert out.shape[0] == 2 and out.shape[-1] == data.num_classes


# ----------------------------------------------------------------------------------------------------- ShapeNetPart
def _write_shapenetpart(path, name, cats, points=64, seed=0, **override):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(seed)
    table = list(SHAPENETPART_PARTS.values())
    pid = np.stack([rng.choice(table[c], size=points) for c in cats])
    arrays = {"data": rng.normal(size=(len(cats), points, 3)).astype(np.float32),
              "label": np.asarray(cats, dtype=np.uint8)[:, None], "pid": pid.astype(np.uint8), **override}
    with h5py.File(path / name, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f[key] = value
    return arrays


def test_shapenetpart_reads_samples_and_checks(tmp_path):
    tr = _write_shapenetpart(tmp_path, "ply_data_train0.h5", [0, 4, 15])
    _write_shapenetpart(tmp_path, "ply_data_val0.h5", [13], seed=1)
    te = _write_shapenetpart(tmp_path, "ply_data_test0.h5", [1, 2], seed=2)
    data = build_data(f"shapenetpart:{tmp_path}", points=32)
    assert (data.task, data.num_classes, len(data.classes)) == ("segment", 50, 50)
    assert data.category_parts == tuple(SHAPENETPART_PARTS.values())
    assert (len(data.train), len(data.test)) == (4, 2)  # val is trained on
    x, y = data.test.__getitems__([0, 1])
    assert x.shape == (2, 32, 3) and y.shape == (2, 32) and y.dtype == torch.int64
    assert category_of(y, data.category_parts).tolist() == [1, 2]
    for b in range(2):  # a subset of the cloud's points, each with its own part id
        for point, part in zip(x[b].numpy(), y[b].tolist(), strict=True):
            i = np.flatnonzero((te["data"][b] == point).all(1))
            assert len(i) and te["pid"][b, i[0]] == part
    xt, _ = data.train.__getitems__([0])
    assert not np.array_equal(xt[0].numpy(), tr["data"][0, :32])  # a random subset, not the first points
    again = build_data(f"shapenetpart:{tmp_path}", points=32, seed=4, augment=False)
    assert torch.equal(again.test.x, data.test.x) and torch.equal(again.train.x, data.train.x)
    assert build_data(f"shapenetpart:{tmp_path}", points=64, need_train=False).test.x.shape == (2, 64, 3)


@pytest.mark.parametrize("override, message", [
    ({"pid": None}, "has no dataset 'pid'"),
    ({"pid": np.zeros((2, 10), dtype=np.uint8)}, "do not match"),
    ({"pid": np.full((2, 64), 40, dtype=np.uint8)}, r"cloud 0 of category 1 has part id 40, not one of its parts "
                                                     r"\(4, 5\)"),
    ({"label": np.array([[1], [16]], dtype=np.uint8)}, "category 16"),
])
def test_shapenetpart_errors(tmp_path, override, message):
    _write_shapenetpart(tmp_path, "train0.h5", [0])
    _write_shapenetpart(tmp_path, "test0.h5", [1, 2], **override)
    with pytest.raises(ValueError, match=message):
        build_data(f"shapenetpart:{tmp_path}", points=8)


def test_shapenetpart_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data(f"shapenetpart:{tmp_path / 'nope'}")
    _write_shapenetpart(tmp_path, "train0.h5", [0])
    with pytest.raises(FileNotFoundError, match=r"no \*test\*.h5 files"):
        build_data(f"shapenetpart:{tmp_path}")
    _write_shapenetpart(tmp_path, "test0.h5", [0])
    with pytest.raises(ValueError, match="holds 64 points per cloud, the model asks for 100"):
        build_data(f"shapenetpart:{tmp_path}", points=100)


# ----------------------------------------------------------------------------------------------------- ADE20K
def _write_ade(root, stems=("ADE_train_1", "ADE_train_2"), val=("ADE_val_1",), label_max=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names in (("training", stems), ("validation", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / "images" / split /
                                                                                     f"{name}.jpg")
            lab = np.zeros((24, 40), dtype=np.uint8)  # left half void, right half label_max (blocks of 4 px)
            lab[:, 20:] = label_max
            Image.fromarray(lab).save(root / "annotations" / split / f"{name}.png")


def test_ade20k_reads_pairs_and_maps_void(tmp_path):
    _write_ade(tmp_path / "ADEChallengeData2016")
    data = build_data(f"ade20k:{tmp_path}", img_size=16)  # the parent of ADEChallengeData2016/ is accepted
    assert (data.task, data.num_classes, data.ignore_index, data.workers > 0) == ("segment", 150, -100, True)
    assert (len(data.train), len(data.test)) == (2, 1)
    x, y = data.test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.shape == (16, 16) and y.dtype == torch.int64
    assert (y[:, :8] == -100).all() and (y[:, 8:] == 2).all()  # 0 -> void, 3 -> class 2, resized nearest
    batch = torch.utils.data.DataLoader(data.train, batch_size=2)
    xb, yb = next(iter(batch))
    assert xb.shape == (2, 3, 16, 16) and yb.shape == (2, 16, 16)
    (tmp_path / "ADEChallengeData2016" / "objectInfo150.csv").write_text(
        "Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\n2,0.1,1,1,building;edifice\n3,0.1,1,1,sky\n")
    named = build_data(f"ade20k:{tmp_path}", img_size=16, need_train=False)
    assert named.num_classes == 3 and named.classes == ["wall", "building", "sky"] and named.train is None
    (tmp_path / "ADEChallengeData2016" / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n1,0.1,1,1,a\n")
    with pytest.raises(DataFileError, match="has label 3 but the data has 1 classes"):
        build_data(f"ade20k:{tmp_path}", img_size=16).test[0]


def test_ade20k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        build_data(f"ade20k:{tmp_path}", img_size=16)
    _write_ade(tmp_path)
    (tmp_path / "annotations" / "validation" / "ADE_val_1.png").rename(tmp_path / "annotations" / "validation" /
                                                                        "ADE_val_9.png")
    with pytest.raises(ValueError, match="ADE_val_1.jpg has no partner named ADE_val_1"):
        build_data(f"ade20k:{tmp_path}", img_size=16, need_train=False)
    (tmp_path / "images" / "training" / "ADE_train_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataFileError, match="ADE_train_1.jpg is not a readable image"):
        build_data(f"ade20k:{tmp_path}", img_size=16)
