"""Datasets for training and evaluation, chosen by one `--data` SPEC string.

  digits                          scikit-learn's 8x8 handwritten digits (shipped with it), fixed stratified 80/20 split
  shapes[:points=N,train=N,...]   procedural point clouds of 10 shape classes, generated on the fly
  imagefolder:PATH                PATH/train/<class>/*.jpg|png... and PATH/val/<class>/... (the ImageNet layout)
  cifar10:PATH, cifar100:PATH     the python-batches layout (cifar-10-batches-py/, cifar-100-python/)
  modelnet40:PATH                 the PointNet HDF5 files (*train*.h5, *test*.h5; needs h5py)
  listops[:length=N,train=N,...]  procedural ListOps expressions (LRA's task, shorter), as bytes, generated here
  textfolder:PATH                 PATH/train/<class>/<file> and PATH/test/<class>/... (or val/), read as bytes

Sequences are bytes (ids 0-255) padded with byte 0 to a common length; `Data.pad_id` tells the training and
evaluation loops to pass the padding as a mask, so padding changes no prediction.

Every random choice (augmentation, shape generation) comes from a generator seeded by (seed, epoch, sample index),
never from a shared stream: the data a sample sees is the same whatever the number of processes, the batch split
or the step at which a run was resumed.
"""
from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from bixt.data.listops import MIN_LENGTH as LISTOPS_MIN_LENGTH
from bixt.data.listops import make_expression
from bixt.data.shapes import SHAPES, make_shape, random_rotation

SPECS = ("digits", "shapes[:points=N,train=N,test=N,seed=N]", "imagefolder:PATH", "cifar10:PATH", "cifar100:PATH",
         "modelnet40:PATH", "listops[:length=N,train=N,test=N,depth=N,seed=N]", "textfolder:PATH")
_PATH_KINDS = ("imagefolder", "cifar10", "cifar100", "modelnet40", "textfolder")
PAD_ID = 0  # byte sequences are padded with byte 0 (NUL, absent from text), masked in the model
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_PCT = 0.875  # eval: resize the short side to size / 0.875, centre-crop `size` (as the authors evaluate)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# The model a data set trains when --model is not given: (name, overrides of its config).
DEFAULT_MODELS = {
    "digits": ("bixt_digits", {}),
    "shapes": ("bixt_shapes", {}),
    "imagefolder": ("bixt_ti_l64_p16", {}),
    "cifar10": ("bixt_ti_l64_p16s4", {"img_size": 32}),
    "cifar100": ("bixt_ti_l64_p16s4", {"img_size": 32}),
    "modelnet40": ("bixt_ti_l64_points", {}),
    "listops": ("bixt_bytes", {}),
    "textfolder": ("bixt_ti_l64_text", {}),
}
_AUG, _CLOUD, _LISTOPS = 0xA06, 0xC10D, 0x1157  # tags keeping the random streams apart


def sample_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: Path | None = None
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.kind}:{self.path}"
        return self.kind + (":" + ",".join(f"{k}={v}" for k, v in self.options.items()) if self.options else "")


_OPTIONS = {  # defaults of the generated data sets' options
    "shapes": {"points": 1024, "train": 4000, "test": 1000, "seed": 0},
    "listops": {"length": 512, "train": 10000, "test": 2000, "depth": 4, "seed": 0},
}


def parse_spec(spec: str) -> DataSpec:
    """`digits`, `shapes:points=4096`, `imagefolder:/data/imagenet`, ... -> DataSpec (paths are not checked here)."""
    kind, _, rest = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not rest:
        return DataSpec("digits")
    if kind in _OPTIONS:
        options, usage = {}, ",".join(f"{k}=N" for k in _OPTIONS[kind])
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in _OPTIONS[kind] or not re.fullmatch(r"\d+", value):
                raise ValueError(f"bad {kind} option {item!r}: use {kind}:{usage} with non-negative integers")
            options[key] = int(value)
        for key, value in options.items():
            least = {"seed": 0, "length": LISTOPS_MIN_LENGTH}.get(key, 1)
            if value < least:
                raise ValueError(f"{kind} needs {key} >= {least}, got {value}")
        return DataSpec(kind, options=options)
    if kind in _PATH_KINDS:
        if not rest:
            raise ValueError(f"--data {kind} needs a path: use {kind}:PATH")
        return DataSpec(kind, Path(rest).expanduser())
    raise ValueError(f"unknown data spec {spec!r}: use one of {', '.join(SPECS)}")


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
            x = self.augment(x, [sample_rng(_AUG, self.seed, self.epoch, i) for i in idx])
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
                                                     sample_rng(_CLOUD, self.data_seed, self.split, i))
                                          for i in idx]))


# ----------------------------------------------------------------------------------------------------- images
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
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{self.files[i]} is not a readable image ({e}): remove or replace it") from None
        im = self._random_crop(im, sample_rng(_AUG, self.seed, self.epoch, i)) if self.train else self._center(im)
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


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_folders(root: Path, held_out: tuple[str, ...], what: str,
                   need_train: bool) -> tuple[Path | None, Path, list[str]]:
    """root/train/<class>/ and root/<held_out>/<class>/ (the first of `held_out` that exists): (the train folder,
    or None when not needed, the held-out folder, the classes), the class folders checked to match."""
    layout = f"train/<class>/ and {' or '.join(held_out)}/<class>/ subfolders of {what}"
    root = _require_dir(root, f"a folder with {layout}")
    test = _require_dir(next((root / n for n in held_out if (root / n).is_dir()), root / held_out[0]),
                        f"{layout} in {root}")
    classes = _class_dirs(test)
    if not need_train:
        return None, test, classes
    train = _require_dir(root / "train", f"{layout} in {root}")
    if _class_dirs(train) != classes:
        raise ValueError(f"{train} and {test} hold different class folders: give both the same classes")
    return train, test, classes


def _class_files(root: Path, classes: list[str], accept, kind: str, what: str) -> tuple[list[Path], list[int]]:
    """The files under root/<class>/ that `accept`, sorted per class, with their class indices."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if accept(p))
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"no {kind} found in the class folders of {root}: expected {what}")
    return files, labels


def _image_files(root: Path, classes: list[str], what: str) -> tuple[list[Path], list[int]]:
    return _class_files(root, classes, lambda p: p.suffix.lower() in IMAGE_SUFFIXES,
                        f"images ({', '.join(IMAGE_SUFFIXES)})", what)


# ----------------------------------------------------------------------------------------------------- files
class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches are pickles: allow numpy arrays and plain containers, refuse every other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
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


def _cifar_arrays(batches: list[Path], label_key: str, classes: int) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for path in batches:
        b = _read_batch(path)
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


_CIFAR = {  # folder, train files, test file, label key, meta file, names key, classes, mean, std
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                "batches.meta", "label_names", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names", 100,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ValueError("modelnet40 data needs h5py: pip install 'bixt[modelnet40]' (or pip install h5py)") \
            from None
    return h5py


def _modelnet_arrays(files: list[Path], points: int) -> tuple[Tensor, Tensor]:
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
def _ids(x: Tensor) -> Tensor:
    return x.long()  # stored as uint8, embedded as int64 ids


def _byte_rows(texts: list[bytes], length: int) -> Tensor:
    """Byte strings as one (n, length) uint8 tensor: cut to `length`, padded with PAD_ID."""
    rows = np.full((len(texts), length), PAD_ID, dtype=np.uint8)
    for row, text in zip(rows, texts, strict=True):
        row[: min(len(text), length)] = np.frombuffer(text[:length], dtype=np.uint8)
    return torch.from_numpy(rows)


def _listops_split(size: int, length: int, depth: int, data_seed: int, split: int) -> TensorSplit:
    texts, labels = [], []
    for i in range(size):
        text, value = make_expression(sample_rng(_LISTOPS, data_seed, split, i), depth, length)
        texts.append(text.encode("ascii"))
        labels.append(value)
    return TensorSplit(_byte_rows(texts, length), torch.tensor(labels), transform=_ids)


def _text_files(root: Path, classes: list[str], length: int) -> tuple[Tensor, Tensor]:
    files, labels = _class_files(root, classes, lambda p: p.is_file() and not p.name.startswith("."), "files",
                                 "<class>/<text file>")
    texts = [path.read_bytes()[:length] for path in files]
    for path, text in zip(files, texts, strict=True):
        if not text.strip(bytes([PAD_ID])):
            raise ValueError(f"{path} is empty (or all NUL bytes, which are padding): remove it")
    return _byte_rows(texts, length), torch.tensor(labels)


# ----------------------------------------------------------------------------------------------------- build
@dataclass
class Data:
    """A data set ready to train or evaluate on: two splits (train may be None) and what a model needs to know."""

    name: str
    modality: str  # image | points | sequence
    num_classes: int
    in_chans: int  # 0: integer ids
    train: Dataset | None
    test: Dataset
    classes: list[str]
    workers: int = 0  # DataLoader workers worth using (decoding files); in-memory sets need none
    vocab_size: int = 0  # sequences of ids: how many there are
    pad_id: int | None = None  # sequences of ids: the id that pads them, to be passed to the model as a mask

    @property
    def input_overrides(self) -> dict:
        ids = {"vocab_size": self.vocab_size} if self.vocab_size else {}
        return {"num_classes": self.num_classes, "in_chans": self.in_chans, **ids}


def _resize(x: Tensor, size: int | None) -> Tensor:
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder: expected {what}")
    return path


def build_data(spec: str | DataSpec, *, img_size: int | None = None, points: int | None = None,
               seq_len: int | None = None, seed: int = 0, augment: bool = True, need_train: bool = True) -> Data:
    """Load or generate the data of `spec`, sized for a model: images resized to `img_size`, `points` per cloud,
    text files cut to `seq_len` bytes (ListOps has its own `length` option).

    `seed` drives the training augmentation; the data themselves (split, generated shapes) do not depend on it.
    """
    spec = spec if isinstance(spec, DataSpec) else parse_spec(spec)
    kind = spec.kind
    if kind == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.from_numpy(digits.images).float()[:, None] / 16.0
        y = torch.from_numpy(digits.target)
        tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
        x = _resize(x, img_size)
        norm = Normalize([x[tr].mean().item()], [x[tr].std().item()])
        aug = ImageAugment(degrees=12, scale=0.1, translate=0.1) if augment else None
        return Data("digits", "image", 10, 1, TensorSplit(x[tr], y[tr], aug, norm, seed),
                    TensorSplit(x[te], y[te], None, norm), [str(i) for i in range(10)])
    if kind == "shapes":
        opts = {**_OPTIONS["shapes"], "points": points or _OPTIONS["shapes"]["points"], **spec.options}
        aug = PointAugment(rotate=True, scale=(0.9, 1.1), jitter=0.005) if augment else None
        return Data("shapes", "points", len(SHAPES), 3,
                    ShapesSplit(opts["train"], opts["points"], opts["seed"], 0, aug, seed),
                    ShapesSplit(opts["test"], opts["points"], opts["seed"], 1), list(SHAPES))
    if kind == "imagefolder":
        tdir, val, classes = _split_folders(spec.path, ("val",), "images", need_train)
        size = img_size or 224
        train = None
        if tdir is not None:
            train = ImageFolderSplit(*_image_files(tdir, classes, "train/<class>/<image>"), size, augment, seed)
        test = ImageFolderSplit(*_image_files(val, classes, "val/<class>/<image>"), size, False)
        return Data("imagefolder", "image", len(classes), 3, train, test, classes, workers=min(8, _cpus()))
    if kind in _CIFAR:
        folder, train_files, test_file, label_key, meta, names_key, k, mean, std = _CIFAR[kind]
        root = _require_dir(spec.path, f"the {kind} python batches (the {folder}/ folder or its parent)")
        root = root / folder if (root / folder).is_dir() else root
        test = _cifar_arrays([root / test_file], label_key, k)
        classes = [n.decode() if isinstance(n, bytes) else str(n)
                   for n in _read_batch(root / meta).get(names_key, [])] if (root / meta).is_file() else []
        norm = Normalize(mean, std)
        aug = ImageAugment(translate=0.125, flip=True) if augment else None
        train = None
        if need_train:
            x, y = _cifar_arrays([root / f for f in train_files], label_key, k)
            train = TensorSplit(_resize(x, img_size), y, aug, norm, seed)
        return Data(kind, "image", k, 3, train, TensorSplit(_resize(test[0], img_size), test[1], None, norm),
                    classes or [str(i) for i in range(k)])
    if kind == "modelnet40":
        root = _require_dir(spec.path, "the PointNet ModelNet40 HDF5 files (*train*.h5, *test*.h5)")
        found = {s: sorted(root.glob(f"*{s}*.h5")) for s in ("train", "test")}
        for split, files in found.items():
            if not files:
                raise FileNotFoundError(f"no *{split}*.h5 files in {root}: expected the PointNet ModelNet40 HDF5 "
                                        "files (ply_data_train0.h5 ..., ply_data_test0.h5 ...)")
        n = points or 1024
        names = root / "shape_names.txt"
        classes = names.read_text().split() if names.is_file() else [str(i) for i in range(40)]
        aug = PointAugment(scale=(2 / 3, 3 / 2), anisotropic=True, translate=0.2) if augment else None
        train = TensorSplit(*_modelnet_arrays(found["train"], n), aug, None, seed) if need_train else None
        test = TensorSplit(*_modelnet_arrays(found["test"], n))
        top = max(int(split.y.max()) for split in (train, test) if split is not None)
        if top >= len(classes):
            raise ValueError(f"{root} has label {top} but {len(classes)} class names: fix shape_names.txt")
        return Data("modelnet40", "points", len(classes), 3, train, test, classes)
    if kind == "listops":
        o = {**_OPTIONS["listops"], **spec.options}
        train = _listops_split(o["train"], o["length"], o["depth"], o["seed"], 0) if need_train else None
        test = _listops_split(o["test"], o["length"], o["depth"], o["seed"], 1)
        return Data("listops", "sequence", 10, 0, train, test, [str(i) for i in range(10)], vocab_size=256,
                    pad_id=PAD_ID)
    if kind == "textfolder":
        tdir, held_out, classes = _split_folders(spec.path, ("test", "val"), "text files", need_train)
        length = seq_len or 4096
        train = None if tdir is None else TensorSplit(*_text_files(tdir, classes, length), transform=_ids)
        test = TensorSplit(*_text_files(held_out, classes, length), transform=_ids)
        return Data("textfolder", "sequence", len(classes), 0, train, test, classes, vocab_size=256, pad_id=PAD_ID)
    raise ValueError(f"unknown data kind {kind!r}: use one of {', '.join(SPECS)}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
