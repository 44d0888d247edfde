"""Files on disk into tensors: class-folder layouts, CIFAR's python batches, (Fashion-)MNIST's IDX files, PointNet's
ModelNet40 and ShapeNetPart HDF5, ADE20K's image / label-map folders, text files.

Every reader checks what it reads and names the file and the fix in its error, since these are the user's files.
"""
from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bixt.data.spec import check_memory
from bixt.data.transforms import sample_rng

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
    if not classes:
        raise ValueError(f"{test} holds no class folders: expected {layout}")
    if not need_train:
        return None, test, classes
    train = require_dir(root / "train", f"{layout} in {root}")
    if class_dirs(train) != classes:
        raise ValueError(f"{train} and {test} hold different class folders: give both the same classes")
    return train, test, classes


def class_files(root: Path, classes: list[str], accept: Callable[[Path], bool], kind: str,
                what: str) -> tuple[list[Path], list[int]]:
    """The files under root/<class>/ that `accept`, sorted per class, with their class indices. A class folder
    without any is refused: it would still count as a class, one the model can never learn or be tested on."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if accept(p))
        if not found:
            raise ValueError(f"class folder {root / name} holds no {kind}: add some, or remove the folder "
                             f"(expected {what})")
        files += found
        labels += [label] * len(found)
    return files, labels


def image_files(root: Path, classes: list[str], what: str) -> tuple[list[Path], list[int]]:
    return class_files(root, classes, lambda p: p.suffix.lower() in IMAGE_SUFFIXES,
                       f"images ({', '.join(IMAGE_SUFFIXES)})", what)


class DataFileError(ValueError):
    """A file of the user's that cannot be read, found while serving a sample. A DataLoader worker's error is
    re-raised in the main process as type(e)(the worker's whole traceback as text); this class keeps only the
    traceback's last line, its own message, so the command line still prints one line naming the file."""

    def __init__(self, message: str):
        last = message.rstrip().splitlines()[-1] if "Traceback" in message else message
        super().__init__(last.partition(f"{type(self).__name__}: ")[2] or last)


def image_problem(path: Path) -> str | None:
    """Why PIL cannot read `path`, or None. Reads the header and runs PIL's verify (for PNG it walks the chunks and
    checks their CRCs, which finds truncation; for JPEG it reads nothing more): ~30 us a JPEG, ~150 us a 200 kB
    PNG, against 2-5 ms to decode one. Truncated JPEG data is found only when decoded (see ImageFolderSplit)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return "an empty file"
        with Image.open(path) as im:
            im.verify()
    except UnidentifiedImageError:
        return "not an image format PIL knows"
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, ValueError, struct.error... for broken files
        return f"{type(e).__name__}: {e}"
    return None


def check_images(files: list[Path], workers: int) -> None:
    """Refuse unreadable image files before training starts, instead of mid-epoch inside a DataLoader worker.
    Threads overlap the reads (image folders often live on network storage), a chunk of files per task so that a
    million files are a few thousand tasks."""
    chunks = [files[i:i + 256] for i in range(0, len(files), 256)]
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for found in pool.map(_first_problem, chunks):
            if found:
                raise DataFileError(f"{found[0]} is not a readable image ({found[1]}): remove or replace it")
    finally:
        pool.shutdown(cancel_futures=True)


def _first_problem(files: list[Path]) -> tuple[Path, str] | None:
    for path in files:
        problem = image_problem(path)
        if problem:
            return path, problem
    return None


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


# ----------------------------------------------------------------------------------------------------- IDX
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one the (Fashion-)MNIST files use
IDX_WHAT = {3: "images", 1: "labels"}  # what an IDX file of so many dimensions holds, for the errors


def idx_file(root: Path, name: str, fix: str) -> Path:
    """root/name or root/name.gz: the files are published gzipped and often stored unpacked."""
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{root / name}(.gz) does not exist: {fix}")


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `dims` dimensions, gzipped or not, as a uint8 array. Its bytes are read
    with numpy, never unpickled; only as many as the header promises (and one more, to find trailing data), so a
    header claiming more than memory is refused before anything is allocated."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"  # by content, not by name: an unpacked file may keep its .gz name
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            shape = _idx_shape(path, f.read(4 + 4 * dims), dims)
            size = math.prod(shape)  # Python's ints: numpy's int64 product would overflow for a corrupt header
            # the bytes, then the float32 images made of them
            check_memory(f"{path} (shape {shape})", 5 * size, "is its header corrupt? re-download it")
            data = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:  # gzip's errors for a corrupt or truncated stream among them
        raise ValueError(f"{path} cannot be read ({e}): re-download it") from None
    if len(data) != size:
        problem = "is truncated" if len(data) < size else "has data past the end"
        raise ValueError(f"{path} {problem}: its header promises {size} bytes of {IDX_WHAT[dims]} {shape}, "
                         "re-download it")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _idx_shape(path: Path, header: bytes, dims: int) -> tuple[int, ...]:
    """The shape in an IDX header: magic 0x0000TTDD (type TT, DD dimensions), then each dimension, big-endian."""
    if len(header) < 4 + 4 * dims:
        raise ValueError(f"{path} is truncated: {len(header)} bytes, shorter than an IDX header, re-download it")
    magic, *shape = struct.unpack(f">{1 + dims}I", header)
    if magic != IDX_UBYTE << 8 | dims:
        raise ValueError(f"{path} has magic number 0x{magic:08x}, not 0x{IDX_UBYTE << 8 | dims:08x} (IDX "
                         f"{IDX_WHAT[dims]}): is it the right file?")
    if 0 in shape:
        raise ValueError(f"{path} holds no {IDX_WHAT[dims]} (shape {tuple(shape)}): re-download it")
    return tuple(shape)


def idx_arrays(images: Path, labels: Path, classes: int) -> tuple[Tensor, Tensor]:
    """An IDX images file and its labels file: (n, 1, H, W) floats in [0, 1], and the labels, checked to match."""
    x, y = read_idx(images, 3), read_idx(labels, 1)
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels: give the two files "
                         "of one split")
    if y.max() >= classes:
        raise ValueError(f"{labels} has label {int(y.max())}, outside 0..{classes - 1}: is it the right file?")
    # astype copies (the arrays read are read-only views of the file's bytes, which torch would warn about), then
    # scaled in place: one float copy, as check_memory counted
    images = x[:, None].astype(np.float32)
    images /= 255
    return torch.from_numpy(images), torch.from_numpy(y.astype(np.int64))


# ----------------------------------------------------------------------------------------------------- ModelNet40
def _h5py():
    # imported here: h5py is an optional extra, needed only for this data set
    try:
        import h5py
    except ImportError:
        raise ValueError("modelnet40 and shapenetpart data need h5py: pip install 'bixt[modelnet40]' (or pip install "
                         "h5py)") from None
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
        if not np.isfinite(data).all():  # would turn every loss into NaN several steps into training
            raise ValueError(f"{path} holds NaN or infinite coordinates: re-download or repair it")
        if label.size and label.min() < 0:
            raise ValueError(f"{path} has label {int(label.min())}: labels must be class indices from 0")
        if data.shape[1] < points:
            raise ValueError(f"{path} holds {data.shape[1]} points per cloud, the model asks for {points}: "
                             f"set the model's seq_len to at most {data.shape[1]}")
        xs.append(data[:, :points, :3])  # the first N points, as PointNet does
        ys.append(label.reshape(-1))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# ----------------------------------------------------------------------------------------------------- ShapeNetPart
# ShapeNetPart's 16 categories (the `label` ids, in this order) and their part ids (the `pid` values): 50 parts
SHAPENETPART_PARTS: dict[str, tuple[int, ...]] = {
    "Airplane": (0, 1, 2, 3), "Bag": (4, 5), "Cap": (6, 7), "Car": (8, 9, 10, 11), "Chair": (12, 13, 14, 15),
    "Earphone": (16, 17, 18), "Guitar": (19, 20, 21), "Knife": (22, 23), "Lamp": (24, 25, 26, 27),
    "Laptop": (28, 29), "Motorbike": (30, 31, 32, 33, 34, 35), "Mug": (36, 37), "Pistol": (38, 39, 40),
    "Rocket": (41, 42, 43), "Skateboard": (44, 45, 46), "Table": (47, 48, 49),
}
SUBSET_STREAM = 0x5B5E  # sample_rng tag of the points kept per cloud (apart from transforms' and dense's tags)


def _dataset(f, path: Path, key: str, dtype) -> np.ndarray:
    if key not in f:
        raise ValueError(f"{path} has no dataset {key!r}: expected PointNet's ShapeNetPart HDF5 files with 'data', "
                         "'label' and 'pid'")
    return np.asarray(f[key], dtype=dtype)


def shapenetpart_arrays(files: list[Path], points: int, split: int) -> tuple[Tensor, Tensor]:
    """`points` points of every cloud in PointNet's ShapeNetPart HDF5 files, (n, points, 3), and their part ids
    (n, points). The points kept are a random subset, the same in every run (drawn from (split,), never from the
    training seed): the files' clouds are not in random order everywhere, so their first points would be biased."""
    h5py = _h5py()
    owner = np.full(1 + max(max(p) for p in SHAPENETPART_PARTS.values()), -1, dtype=np.int64)
    for c, parts in enumerate(SHAPENETPART_PARTS.values()):
        owner[list(parts)] = c
    rng = sample_rng(SUBSET_STREAM, split)
    xs, ys = [], []
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                data, label = _dataset(f, path, "data", np.float32), _dataset(f, path, "label", np.int64)
                pid = _dataset(f, path, "pid", np.int64)
        except OSError as e:
            raise ValueError(f"{path} is not an HDF5 file ({e}): re-download it") from None
        label = label.reshape(-1)
        if data.ndim != 3 or data.shape[2] < 3 or pid.shape != data.shape[:2] or len(label) != len(data):
            raise ValueError(f"{path}: 'data' {data.shape}, 'label' {label.shape}, 'pid' {pid.shape} do not match: "
                             "expected (B, points, 3), (B, 1) and (B, points)")
        if not np.isfinite(data).all():
            raise ValueError(f"{path} holds NaN or infinite coordinates: re-download or repair it")
        if label.size and (label.min() < 0 or label.max() >= len(SHAPENETPART_PARTS)):
            raise ValueError(f"{path} has category {int(label.max())}: ShapeNetPart's categories are 0..15")
        cats = np.where((pid >= 0) & (pid < len(owner)), owner[pid.clip(0, len(owner) - 1)], -1)
        bad = np.argwhere(cats != label[:, None])
        if len(bad):
            b, i = bad[0]
            raise ValueError(f"{path}: cloud {b} of category {label[b]} has part id {pid[b, i]}, not one of its "
                             f"parts {SHAPENETPART_PARTS[list(SHAPENETPART_PARTS)[label[b]]]}: is it ShapeNetPart?")
        if data.shape[1] < points:
            raise ValueError(f"{path} holds {data.shape[1]} points per cloud, the model asks for {points}: "
                             f"set the model's seq_len to at most {data.shape[1]}")
        keep = np.argpartition(rng.random(pid.shape), points - 1, axis=1)[:, :points]
        xs.append(np.take_along_axis(data[:, :, :3], keep[:, :, None], axis=1))
        ys.append(np.take_along_axis(pid, keep, axis=1))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# ----------------------------------------------------------------------------------------------------- ADE20K
ADE20K_CLASSES = 150


def segmentation_pairs(images: Path, annotations: Path) -> tuple[list[Path], list[Path]]:
    """The images under `images` and their label maps, annotations/<same stem>.png, both sorted by stem; a file
    of one without its partner in the other is refused."""
    require_dir(images, "ADE20K's images/<split>/ folder of .jpg images")
    require_dir(annotations, "ADE20K's annotations/<split>/ folder of .png label maps")
    found = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    labels = {p.stem: p for p in annotations.iterdir() if p.suffix.lower() == ".png"}
    if not found:
        raise ValueError(f"{images} holds no images ({', '.join(IMAGE_SUFFIXES)}): expected ADE20K's layout")
    for stem in sorted(found.keys() ^ labels.keys()):
        have, lack = (found[stem], annotations) if stem in found else (labels[stem], images)
        raise ValueError(f"{have} has no partner named {stem}.* in {lack}: every image needs a label map of the "
                         "same name (and back), remove the odd file")
    stems = sorted(found)
    return [found[s] for s in stems], [labels[s] for s in stems]


def ade20k_classes(root: Path) -> list[str]:
    """The class names: from objectInfo150.csv (ADEChallengeData2016's table: Idx,Ratio,Train,Val,Name, one row
    per class in label order) when the folder has it, else ADE20K's 150 classes, unnamed."""
    table = root / "objectInfo150.csv"
    if not table.is_file():
        return [str(i) for i in range(ADE20K_CLASSES)]
    try:
        rows = [line.split(",") for line in table.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{table} is not UTF-8 text: it should be ADE20K's class table") from None
    if not rows:
        raise ValueError(f"{table} lists no classes: expected a header and one row per class")
    return [row[-1].strip().split(";")[0] or str(i) for i, row in enumerate(rows)]


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
    check_memory(f"{len(files)} text files at seq_len={length}", 2 * len(files) * length,
                 "use a model with a smaller seq_len")
    texts = [_head(path, length) for path in files]
    for path, text in zip(files, texts, strict=True):
        if not text.strip(bytes([PAD_ID])):
            raise ValueError(f"{path} is empty (or all NUL bytes, which are padding): remove it")
    return byte_rows(texts, length), torch.tensor(labels)


def _head(path: Path, length: int) -> bytes:
    with open(path, "rb") as f:  # only what is kept: a text file may be far larger than seq_len
        return f.read(length)
