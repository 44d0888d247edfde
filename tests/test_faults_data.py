"""Bad `--data` input, each refused before any work with one line naming the problem and the fix: repeated or
unknown keys, bad numbers, sizes beyond any memory, empty class folders, unreadable image files, foreign files."""
import pickle

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

import bixt.data.spec as spec_module
from bixt.data import DataFileError, build_data, check_same_classes, parse_spec
from bixt_cli.main import app

runner = CliRunner()
GIB = 2**30


def _train(tmp_path, spec: str):
    return runner.invoke(app, ["train", "--data", spec, "--epochs", "1", "--out", str(tmp_path / "run")])


def _png(path, size=(8, 8), colour=(255, 0, 0)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _folder(root, classes=("cat", "dog")):
    for split in ("train", "val"):
        for name in classes:
            _png(root / split / name / "a.png")
    return root


# ----------------------------------------------------------------------------------------------------- 1: keys
@pytest.mark.parametrize("spec", ["shapes:points=64,points=128", "shapes:points=64,train=8,points=64",
                                  "listops:length=64, length=128"])
def test_a_repeated_key_is_refused(spec):
    with pytest.raises(ValueError, match="key '(points|length)' given twice"):
        parse_spec(spec)


def test_a_repeated_key_is_one_line_at_the_cli(tmp_path):
    assert_one_line_error(_train(tmp_path, "shapes:points=64,points=128"), "--data key 'points' given twice")


# ----------------------------------------------------------------------------------------------------- 2: sizes
@pytest.mark.parametrize("spec, message", [
    ("shapes:points=999999999999", "shapes points=999999999999 is too large: use points <= 2147483647"),
    ("shapes:train=99999999999999", "train=99999999999999 is too large"),
    ("shapes:test=2147483648", "test=2147483648 is too large"),
    ("listops:length=999999999999", "length=999999999999 is too large"),
    ("listops:depth=5000", "depth=5000 is too large: use depth <= 100"),  # deeper hits Python's recursion limit
    ("shapes:points=" + "9" * 5000, r"points=99999999\.\.\.\(5000 digits\) is too large"),
    ("shapes:points=-5", "points takes a whole number from 1"),
    ("shapes:points=abc", "points takes a whole number from 1"),
    ("shapes:points=3.5", "points takes a whole number from 1"),
    ("shapes:points=", "points takes a whole number from 1"),
    ("shapes:points=0", "shapes needs points >= 1, got 0: use points=1 or more"),
    ("listops:length=5", "listops needs length >= 10, got 5"),
    ("shapes:colour=3", "shapes has no option 'colour'"),
])
def test_bad_numbers_and_huge_sizes_are_refused_at_parse(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_spaces_around_keys_and_values_are_accepted():
    assert parse_spec("shapes: points = 64 , train=8").options == {"points": 64, "train": 8}


@pytest.mark.parametrize("spec, kwargs, message", [
    ("shapes:points=200000000,train=8,test=8", {}, "shapes with points=200000000"),
    ("shapes:points=8,train=2000000000,test=8", {}, "train=2000000000"),
    ("listops:length=1000000,train=100000", {}, "listops with length=1000000"),
    ("digits", {"img_size": 100000}, "images resized to img_size=100000"),
])
def test_data_beyond_memory_is_refused_before_allocating(spec, kwargs, message, monkeypatch):
    monkeypatch.setattr(spec_module, "memory_bytes", lambda: 8 * GIB)
    with pytest.raises(ValueError, match=f"{message}.* GiB of memory, more than this machine's 8.0 GiB"):
        build_data(spec, **kwargs)


def test_memory_is_read_from_the_system():
    assert spec_module.memory_bytes() > 2**28  # any machine that runs the tests has more than 256 MiB


@pytest.mark.parametrize("kwargs, message", [({"img_size": 0}, "img_size=0"), ({"points": -3}, "points=-3"),
                                             ({"seq_len": 2**40}, "seq_len=1099511627776"),
                                             ({"img_size": 2.5}, "img_size=2.5")])
def test_sizes_a_model_asks_for_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=f"the model's {message} is not a usable size"):
        build_data("shapes:train=4,test=4", **kwargs)


def test_huge_sizes_are_one_line_at_the_cli(tmp_path, monkeypatch):
    assert_one_line_error(_train(tmp_path, "shapes:points=999999999999"), "points=999999999999 is too large")
    monkeypatch.setattr(spec_module, "memory_bytes", lambda: 8 * GIB)
    assert_one_line_error(_train(tmp_path, "shapes:points=2000000000"), "more than this machine's 8.0 GiB")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


# ----------------------------------------------------------------------------------------------------- 3: classes
def test_an_empty_class_folder_is_refused(tmp_path):
    root = _folder(tmp_path / "img")
    (root / "train" / "eel").mkdir()
    (root / "val" / "eel").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*train/eel holds no images"):
        build_data(f"imagefolder:{root}")
    with pytest.raises(ValueError, match=r"class folder .*val/eel holds no images"):
        build_data(f"imagefolder:{root}", need_train=False)  # evaluation reads val/ only
    assert_one_line_error(_train(tmp_path, f"imagefolder:{root}"), "eel holds no images")


def test_an_empty_text_class_folder_is_refused(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "x.txt").write_text("hello")
        (tmp_path / split / "b").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*train/b holds no files"):
        build_data(f"textfolder:{tmp_path}")


def test_a_split_without_class_folders_is_refused(tmp_path):
    _png(tmp_path / "val" / "a.png")  # images straight in val/, no class folders
    with pytest.raises(ValueError, match=r"val holds no class folders: expected train/<class>/ and val/<class>/"):
        build_data(f"imagefolder:{tmp_path}", need_train=False)


# ----------------------------------------------------------------------------------------------------- 4: names
def test_check_same_classes():
    check_same_classes(["cat", "dog"], ["cat", "dog"])
    check_same_classes(["cat", "dog", "eel"], ["cat", "dog"])  # the first classes: labels mean the same
    with pytest.raises(ValueError, match="the data's class 1 is 'fox' but the model's class 1 is 'dog'"):
        check_same_classes(["cat", "dog"], ["cat", "fox"])
    with pytest.raises(ValueError, match="the data's class 0 is 'dog' but the model's class 0 is 'cat'"):
        check_same_classes(["cat", "dog", "eel"], ["dog", "eel"])  # a subset that shifts the labels
    with pytest.raises(ValueError, match="the data has 3 classes but the model was trained on 2"):
        check_same_classes(["cat", "dog"], ["cat", "dog", "eel"])


def test_data_names_its_classes_in_label_order(tmp_path):
    a = build_data(f"imagefolder:{_folder(tmp_path / 'a', ('cat', 'dog'))}", img_size=8, need_train=False)
    b = build_data(f"imagefolder:{_folder(tmp_path / 'b', ('ant', 'bee'))}", img_size=8, need_train=False)
    assert a.classes == ["cat", "dog"] and b.classes == ["ant", "bee"]  # same count, other classes
    with pytest.raises(ValueError, match="class 0 is 'ant' but the model's class 0 is 'cat'"):
        check_same_classes(a.classes, b.classes)
    assert build_data("shapes:train=4,test=4").classes[:2] == ["sphere", "ellipsoid"]


# ----------------------------------------------------------------------------------------------------- 5: images
def _truncated_png(path):
    data = _png(path, (64, 64)).read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, write, reason", [
    ("zero.png", lambda p: p.write_bytes(b""), "an empty file"),
    ("note.png", lambda p: p.write_text("not an image"), "not an image format PIL knows"),
    ("t.png", _truncated_png, "OSError"),
    ("head.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0garbage"), "OSError"),
])
def test_unreadable_images_are_refused_before_training(tmp_path, name, write, reason):
    root = _folder(tmp_path / "img")
    write(root / "train" / "cat" / name)
    with pytest.raises(ValueError, match=f"{name} is not a readable image \\({reason}"):
        build_data(f"imagefolder:{root}", img_size=8)
    result = _train(tmp_path, f"imagefolder:{root}")
    assert_one_line_error(result, f"{name} is not a readable image")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_a_broken_image_found_late_is_one_line_even_from_a_worker(tmp_path):
    """Truncated JPEG data passes the header check and is found only when decoded, in a DataLoader worker, which
    re-raises the error with the worker's traceback as its message: still one line, naming the file."""
    from PIL import Image

    root = _folder(tmp_path / "img")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    bad = root / "val" / "cat" / "b.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # the header intact
    data = build_data(f"imagefolder:{root}", img_size=8, need_train=False)
    index = data.test.files.index(bad)
    with pytest.raises(DataFileError, match="b.jpg is not a readable image") as caught:
        data.test[index]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data.test, [index]), num_workers=1)
    with pytest.raises(ValueError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert message.startswith(str(bad)) and "is not a readable image" in message, message
    assert "Traceback" not in message and "\n" not in message, message


# ----------------------------------------------------------------------------------------------------- 6: files
def test_a_cifar_meta_file_of_another_variant_is_refused(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 100}))
    with pytest.raises(ValueError, match="names 100 classes, cifar10 has 10: is it the right CIFAR variant"):
        build_data(f"cifar10:{tmp_path}")


@pytest.mark.parametrize("fault, message", [
    ("negative-label", "has label -1: labels must be class indices from 0"),
    ("nan-point", "holds NaN or infinite coordinates"),
    ("latin1-names", "shape_names.txt is not UTF-8 text"),
])
def test_a_broken_modelnet_file_is_refused(tmp_path, fault, message):
    h5py = pytest.importorskip("h5py")
    for name in ("ply_data_train0.h5", "ply_data_test0.h5"):
        with h5py.File(tmp_path / name, "w") as f:
            f["data"] = np.full((2, 64, 3), np.nan if fault == "nan-point" else 0.0, dtype=np.float32)
            f["label"] = np.array([[0], [-1 if fault == "negative-label" else 1]], dtype=np.int8)
    if fault == "latin1-names":
        (tmp_path / "shape_names.txt").write_bytes("caf\xe9\nbed\n".encode("latin-1"))
    with pytest.raises(ValueError, match=message):
        build_data(f"modelnet40:{tmp_path}", points=32)


def test_a_text_file_is_read_only_as_far_as_kept(tmp_path, monkeypatch):
    from pathlib import Path

    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "x.txt").write_bytes(b"y" * 100_000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a whole file"))
    data = build_data(f"textfolder:{tmp_path}", seq_len=16)
    assert data.test.x.shape == (2, 16)
