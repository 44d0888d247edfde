"""Files on disk into tensors: class-folder layouts, CIFAR's python batches, PointNet's ModelNet40 HDF5, text files.

Every reader checks what it reads and names the file and the fix in its error, since these are the user's files.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

PAD_ID = 0  # byte sequences are padded with byte 0 (NUL, absent from text), masked in the model
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------- folders
def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder: expected {what}")
    return path


def class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folders(root: Path, held_out: tuple[str, ...], what: str,
                  need_train: bool) -> tuple[Path | None, Path, list[str]]:
    """root/train/<class>/ and root/<held_out>/<class>/ (the first of `held_out` that exists): (the train folder,
    or None when not needed, the held-out folder, the classes), the class folders checked to match."""
    layout = f"train/<class>/ and {' or '.join(held_out)}/<class>/ subfolders of {what}"
    root = require_dir(root, f"a folder with {layout}")
    test = require_dir(next((root / n for n in held_out if (root / n).is_dir()), root / held_out[0]),
                       f"{layout} in {root}")
    classes = class_dirs(test)
    if not need_train:
        return None, test, classes
    train = require_dir(root / "train", f"{layout} in {root}")
    if class_dirs(train) != classes:
        raise ValueError(f"{train} and {test} hold different class folders: give both the same classes")
    return train, test, classes


def class_files(root: Path, classes: list[str], accept: Callable[[Path], bool], kind: str,
                what: str) -> tuple[list[Path], list[int]]:
    """The files under root/<class>/ that `accept`, sorted per class, with their class indices."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if accept(p))
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"no {kind} found in the class folders of {root}: expected {what}")
    return files, labels


def image_files(root: Path, classes: list[str], what: str) -> tuple[list[Path], list[int]]:
    return class_files(root, classes, lambda p: p.suffix.lower() in IMAGE_SUFFIXES,
                       f"images ({', '.join(IMAGE_SUFFIXES)})", what)


# ----------------------------------------------------------------------------------------------------- CIFAR
class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches are pickles, and a pickle can run any code it names: allow numpy arrays and plain
    containers, refuse every other global, so a tampered batch fails instead of running."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    """One CIFAR python batch (or meta file) as a dict with str keys."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected the CIFAR python-batches layout there")
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a CIFAR python batch ({e}): re-extract the archive") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR python batch (holds a {type(batch).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def cifar_arrays(batches: list[Path], label_key: str, classes: int) -> tuple[Tensor, Tensor]:
    """The images of CIFAR batches as (n, 3, 32, 32) floats in [0, 1], and their labels."""
    xs, ys = [], []
    for path in batches:
        b = read_batch(path)
        if "data" not in b or label_key not in b:
            raise ValueError(f"{path} lacks the keys 'data' and '{label_key}': is it the right CIFAR variant?")
        data = np.asarray(b["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(b[label_key]):
            raise ValueError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072) with N labels")
        labels = np.asarray(b[label_key], dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"{path} has labels outside 0..{classes - 1}: is it the right CIFAR variant?")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)).float() / 255.0, torch.from_numpy(np.concatenate(ys))


# ----------------------------------------------------------------------------------------------------- ModelNet40
def _h5py():
    # imported here: h5py is an optional extra, needed only for this data set
    try:
        import h5py
    except ImportError:
        raise ValueError("modelnet40 data needs h5py: pip install 'bixt[modelnet40]' (or pip install h5py)") \
            from None
    return h5py


def modelnet_arrays(files: list[Path], points: int) -> tuple[Tensor, Tensor]:
    """The first `points` points of every cloud in PointNet's HDF5 files, (n, points, 3), and their labels."""
    h5py = _h5py()
    xs, ys = [], []
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                data, label = np.asarray(f["data"], dtype=np.float32), np.asarray(f["label"], dtype=np.int64)
        except (OSError, KeyError) as e:
            raise ValueError(f"{path} is not a PointNet HDF5 file with 'data' and 'label' ({e})") from None
        if data.ndim != 3 or data.shape[2] < 3 or len(data) != len(label):
            raise ValueError(f"{path}: 'data' has shape {data.shape}, expected (N, points, 3) with N labels")
        if data.shape[1] < points:
            raise ValueError(f"{path} holds {data.shape[1]} points per cloud, the model asks for {points}: "
                             f"set the model's seq_len to at most {data.shape[1]}")
        xs.append(data[:, :points, :3])  # the first N points, as PointNet does
        ys.append(label.reshape(-1))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# ----------------------------------------------------------------------------------------------------- bytes
def byte_rows(texts: list[bytes], length: int) -> Tensor:
    """Byte strings as one (n, length) uint8 tensor: cut to `length`, padded with PAD_ID."""
    rows = np.full((len(texts), length), PAD_ID, dtype=np.uint8)
    for row, text in zip(rows, texts, strict=True):
        row[: min(len(text), length)] = np.frombuffer(text[:length], dtype=np.uint8)
    return torch.from_numpy(rows)


def text_files(root: Path, classes: list[str], length: int) -> tuple[Tensor, Tensor]:
    """The files under root/<class>/ as byte rows of `length` (see `byte_rows`), and their class indices."""
    files, labels = class_files(root, classes, lambda p: p.is_file() and not p.name.startswith("."), "files",
                                "<class>/<text file>")
    texts = [path.read_bytes()[:length] for path in files]
    for path, text in zip(files, texts, strict=True):
        if not text.strip(bytes([PAD_ID])):
            raise ValueError(f"{path} is empty (or all NUL bytes, which are padding): remove it")
    return byte_rows(texts, length), torch.tensor(labels)
