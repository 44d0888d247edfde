"""Fashion-MNIST read from its four IDX files (gzipped or not), written small here: parsing, the built data, a run
through `bixt train` and `bixt eval`, and bad files refused with one line naming the file."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from bixt.data import DataSpec, build_data, parse_spec
from bixt.data.readers import read_idx
from bixt.data.sources import FASHION_MNIST_DIR
from bixt_cli.main import app

runner = CliRunner()
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _idx(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 <dims>, each dimension big-endian, then the bytes."""
    return struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.astype(np.uint8).tobytes()


def _write(path, data: bytes, gz: bool):
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _fashion(root, train=64, test=32, gz=True, seed=0):
    """The four files of a tiny Fashion-MNIST in `root` (train gzipped when `gz`, t10k the other way); returns
    the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n, zipped in (("train", train, gz), ("t10k", test, not gz)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10
        _write(root / f"{prefix}-images-idx3-ubyte", _idx(x), zipped)
        _write(root / f"{prefix}-labels-idx1-ubyte", _idx(y), zipped)
        arrays[prefix] = x, y
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_returns_the_array_written(tmp_path, gz):
    x = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(read_idx(_write(tmp_path / "images", _idx(x), gz), 3), x)
    y = np.array([9, 0, 3], dtype=np.uint8)
    assert np.array_equal(read_idx(_write(tmp_path / "labels", _idx(y), gz), 1), y)


def test_spec_with_and_without_a_path():
    assert parse_spec("fashion-mnist:/data/fm").path.as_posix() == "/data/fm"
    assert parse_spec("fashion-mnist") == DataSpec("fashion-mnist", FASHION_MNIST_DIR)
    assert FASHION_MNIST_DIR.as_posix() == "/usr/share/datasets/fashion-mnist"


def test_a_folder_builds_data_with_the_files_images_and_classes(tmp_path):
    arrays = _fashion(tmp_path)
    data = build_data(f"fashion-mnist:{tmp_path}", augment=False)
    assert (data.name, data.modality, data.num_classes, data.in_chans) == ("fashion-mnist", "image", 10, 1)
    assert data.classes == CLASSES
    assert data.train.x.shape == (64, 1, 28, 28) and data.test.x.shape == (32, 1, 28, 28)
    assert torch.equal(data.test.x[:, 0], torch.from_numpy(arrays["t10k"][0]).float() / 255)
    assert torch.equal(data.train.y, torch.from_numpy(arrays["train"][1]).long())
    x, y = data.test.__getitems__(list(range(4)))
    assert x.shape == (4, 1, 28, 28) and torch.equal(y, torch.arange(4))
    assert build_data(f"fashion-mnist:{tmp_path}", img_size=32).train.x.shape[-2:] == (32, 32)
    assert build_data(f"fashion-mnist:{tmp_path}", need_train=False).train is None


def test_train_then_eval_at_the_cli(tmp_path):
    _fashion(tmp_path / "fm")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", f"fashion-mnist:{tmp_path / 'fm'}", "--epochs", "1",
                                 "--batch-size", "32", "--out", str(run)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["samples"] == 32 and got["model"] == "bixt_digits" and 0 <= got["top1"] <= 1


def _cli_train(tmp_path, root):
    return runner.invoke(app, ["train", "--data", f"fashion-mnist:{root}", "--epochs", "1",
                               "--out", str(tmp_path / "run")])


def test_a_missing_folder_names_the_file_the_package_and_the_path_form(tmp_path):
    result = _cli_train(tmp_path, tmp_path / "absent")
    assert_one_line_error(result, f"{tmp_path / 'absent' / 'train-images-idx3-ubyte'}(.gz) does not exist")
    assert "apt-get install dataset-fashion-mnist" in result.output and "fashion-mnist:PATH" in result.output


def test_a_missing_test_file_is_named(tmp_path):
    _fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()  # t10k is written unpacked when train is gzipped
    assert_one_line_error(_cli_train(tmp_path, tmp_path), "t10k-labels-idx1-ubyte(.gz) does not exist")


def _corrupt(root, name, data: bytes):
    for path in root.glob(f"{name}*"):
        path.unlink()
    (root / name).write_bytes(data)
    return root / name


IMAGES = np.zeros((64, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("name, data, message", [
    ("train-images-idx3-ubyte", _idx(IMAGES)[:-10], "is truncated: its header promises 50176 bytes of images"),
    ("train-images-idx3-ubyte", _idx(IMAGES) + b"\0", "has data past the end"),
    ("train-images-idx3-ubyte", b"\0\0\x08", "shorter than an IDX header"),
    ("train-images-idx3-ubyte", _idx(np.zeros((64, 28), dtype=np.uint8)), "magic number 0x00000802, not 0x00000803"),
    ("train-labels-idx1-ubyte", _idx(IMAGES), "magic number 0x00000803, not 0x00000801"),
    ("train-labels-idx1-ubyte", _idx(np.zeros(63, dtype=np.uint8)), "holds 64 images but"),
    ("train-labels-idx1-ubyte", _idx(np.full(64, 10, dtype=np.uint8)), "has label 10, outside 0..9"),
    ("train-images-idx3-ubyte", _idx(np.zeros((0, 28, 28), dtype=np.uint8)), "holds no images"),
    ("train-images-idx3-ubyte", gzip.compress(_idx(IMAGES))[:-20], "cannot be read"),  # a cut gzip stream
    # a header claiming 2**32-1 images of 65535 x 65535 is refused before anything is allocated
    ("train-images-idx3-ubyte", struct.pack(">4I", 0x803, 2**32 - 1, 65535, 65535), "re-download it"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, name, data, message):
    _fashion(tmp_path)
    path = _corrupt(tmp_path, name, data)
    result = _cli_train(tmp_path, tmp_path)
    assert_one_line_error(result, message)
    assert str(path) in result.output
