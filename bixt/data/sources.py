"""One loader per data kind and TABLE, the kinds `--data` knows: kind -> Source (loader, default model, argument).

`parse_spec` and `build_data` dispatch through TABLE, and SPECS and DEFAULT_MODELS are read off it, so a new data
kind is one loader function and one row.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from bixt.data.datasets import ImageFolderSplit, ShapesSplit, TensorSplit
from bixt.data.dense import (
    CATEGORY_PARTS,
    PART_NAMES,
    SCENE_CLASSES,
    PartShapesSplit,
    SegFolderSplit,
    SegScenesSplit,
)
from bixt.data.listops import MIN_LENGTH as LISTOPS_MIN_LENGTH
from bixt.data.listops import make_expression
from bixt.data.readers import (
    PAD_ID,
    SHAPENETPART_PARTS,
    ade20k_classes,
    byte_rows,
    check_images,
    cifar_arrays,
    idx_arrays,
    idx_file,
    image_files,
    modelnet_arrays,
    read_batch,
    require_dir,
    segmentation_pairs,
    shapenetpart_arrays,
    split_folders,
    text_files,
)
from bixt.data.shapes import SHAPES
from bixt.data.spec import Data, DataSpec, Request, Source, check_memory, check_size
from bixt.data.transforms import LISTOPS_STREAM, ImageAugment, Normalize, PointAugment, as_ids, resize, sample_rng


def load_digits(spec: DataSpec, req: Request) -> Data:
    # scikit-learn is slow to import and only this kind needs it
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = torch.from_numpy(digits.images).float()[:, None] / 16.0
    y = torch.from_numpy(digits.target)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    x = resize(x, req.img_size)
    norm = Normalize([x[tr].mean().item()], [x[tr].std().item()])
    aug = ImageAugment(degrees=12, scale=0.1, translate=0.1) if req.augment else None
    return Data("digits", "image", 10, 1, TensorSplit(x[tr], y[tr], aug, norm, req.seed),
                TensorSplit(x[te], y[te], None, norm), [str(i) for i in range(10)])


SHAPES_OPTIONS = {"points": 1024, "train": 4000, "test": 1000, "seed": 0}
# generating one cloud holds 2x candidates in float64 with their keys, norms and sort order: ~160 bytes a point,
# and the float32 clouds of a batch come on top; rounded up
CLOUD_BYTES_PER_POINT = 256


def load_shapes(spec: DataSpec, req: Request) -> Data:
    # a points option in the spec beats the model's point count, which beats the default
    opts = {**SHAPES_OPTIONS, "points": req.points or SHAPES_OPTIONS["points"], **spec.options}
    check_memory(f"shapes with points={opts['points']}, train={opts['train']}, test={opts['test']}",
                 opts["points"] * CLOUD_BYTES_PER_POINT + 8 * (opts["train"] + opts["test"]),
                 "use fewer points or samples")
    aug = PointAugment(rotate=True, scale=(0.9, 1.1), jitter=0.005) if req.augment else None
    return Data("shapes", "points", len(SHAPES), 3,
                ShapesSplit(opts["train"], opts["points"], opts["seed"], 0, aug, req.seed),
                ShapesSplit(opts["test"], opts["points"], opts["seed"], 1), list(SHAPES))


def load_imagefolder(spec: DataSpec, req: Request) -> Data:
    tdir, val, classes = split_folders(spec.path, ("val",), "images", req.need_train)
    size = req.img_size or 224
    # each image is decoded, cropped and normalized in float32 (~4 copies of 3 x size x size)
    check_memory(f"one image at img_size={size}", 48 * size * size, "use a model with a smaller img_size")
    workers = min(8, _cpus())
    train = None
    if tdir is not None:
        files, labels = image_files(tdir, classes, "train/<class>/<image>")
        check_images(files, workers)
        train = ImageFolderSplit(files, labels, size, req.augment, req.seed)
    files, labels = image_files(val, classes, "val/<class>/<image>")
    check_images(files, workers)
    test = ImageFolderSplit(files, labels, size, False)
    return Data("imagefolder", "image", len(classes), 3, train, test, classes, workers=workers)


class CifarLayout(NamedTuple):
    """One CIFAR variant's python-batches layout, and the channel statistics of its training images."""

    folder: str  # the archive's top folder
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    meta_file: str
    names_key: str  # the class names' key in the meta file
    classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels",
                      "batches.meta", "label_names", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = CifarLayout("cifar-100-python", ("train",), "test", "fine_labels", "meta", "fine_label_names", 100,
                       (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def load_cifar(layout: CifarLayout, spec: DataSpec, req: Request) -> Data:
    kind, k = spec.kind, layout.classes
    root = require_dir(spec.path, f"the {kind} python batches (the {layout.folder}/ folder or its parent)")
    root = root / layout.folder if (root / layout.folder).is_dir() else root
    test = cifar_arrays([root / layout.test_file], layout.label_key, k)
    meta = root / layout.meta_file
    classes = [n.decode(errors="replace") if isinstance(n, bytes) else str(n)
               for n in read_batch(meta).get(layout.names_key, [])] if meta.is_file() else []
    if classes and len(classes) != k:
        raise ValueError(f"{meta} names {len(classes)} classes, {kind} has {k}: is it the right CIFAR variant?")
    norm = Normalize(layout.mean, layout.std)
    aug = ImageAugment(translate=0.125, flip=True) if req.augment else None
    train = None
    if req.need_train:
        x, y = cifar_arrays([root / f for f in layout.train_files], layout.label_key, k)
        train = TensorSplit(resize(x, req.img_size), y, aug, norm, req.seed)
    return Data(kind, "image", k, 3, train, TensorSplit(resize(test[0], req.img_size), test[1], None, norm),
                classes or [str(i) for i in range(k)])


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
# the mean and std of the 60,000 official training images: fixed like CIFAR's, so that evaluation, which reads
# only the t10k files, normalizes as training did
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def load_fashion_mnist(spec: DataSpec, req: Request) -> Data:
    fix = (f"apt-get install dataset-fashion-mnist (Debian's package, into {FASHION_MNIST_DIR}/), or give the "
           "folder holding the four IDX files as --data fashion-mnist:PATH")
    k, norm = len(FASHION_MNIST_CLASSES), Normalize([FASHION_MNIST_MEAN], [FASHION_MNIST_STD])

    def split(prefix: str) -> tuple:
        images = idx_file(spec.path, f"{prefix}-images-idx3-ubyte", fix)
        x, y = idx_arrays(images, idx_file(spec.path, f"{prefix}-labels-idx1-ubyte", fix), k)
        return resize(x, req.img_size), y

    # CIFAR's shifts and flips: a garment or shoe mirrored is still one of its class (a digit is not)
    aug = ImageAugment(translate=0.1, flip=True) if req.augment else None
    train = TensorSplit(*split("train"), aug, norm, req.seed) if req.need_train else None
    return Data("fashion-mnist", "image", k, 1, train, TensorSplit(*split("t10k"), None, norm),
                list(FASHION_MNIST_CLASSES))


def load_modelnet40(spec: DataSpec, req: Request) -> Data:
    root = require_dir(spec.path, "the PointNet ModelNet40 HDF5 files (*train*.h5, *test*.h5)")
    found = {s: sorted(root.glob(f"*{s}*.h5")) for s in ("train", "test")}
    for split, files in found.items():
        if not files:
            raise FileNotFoundError(f"no *{split}*.h5 files in {root}: expected the PointNet ModelNet40 HDF5 "
                                    "files (ply_data_train0.h5 ..., ply_data_test0.h5 ...)")
    n = req.points or 1024
    names = root / "shape_names.txt"
    classes = _names(names) if names.is_file() else [str(i) for i in range(40)]
    aug = PointAugment(scale=(2 / 3, 3 / 2), anisotropic=True, translate=0.2) if req.augment else None
    train = TensorSplit(*modelnet_arrays(found["train"], n), aug, None, req.seed) if req.need_train else None
    test = TensorSplit(*modelnet_arrays(found["test"], n))
    top = max(int(split.y.max()) for split in (train, test) if split is not None)
    if top >= len(classes):
        raise ValueError(f"{root} has label {top} but {len(classes)} class names: fix shape_names.txt")
    return Data("modelnet40", "points", len(classes), 3, train, test, classes)


def _names(path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split()
    except UnicodeDecodeError:  # a ValueError that would not name the file
        raise ValueError(f"{path} is not UTF-8 text: it should list the class names, one a line") from None


def _listops_split(size: int, length: int, depth: int, data_seed: int, split: int) -> TensorSplit:
    texts, labels = [], []
    for i in range(size):
        text, value = make_expression(sample_rng(LISTOPS_STREAM, data_seed, split, i), depth, length)
        texts.append(text.encode("ascii"))
        labels.append(value)
    return TensorSplit(byte_rows(texts, length), torch.tensor(labels), transform=as_ids)


LISTOPS_OPTIONS = {"length": 512, "train": 10000, "test": 2000, "depth": 4, "seed": 0}
LISTOPS_MAX_DEPTH = 100  # the generator recurses once per level (LRA uses 10): deeper would hit Python's limit


def load_listops(spec: DataSpec, req: Request) -> Data:
    o = {**LISTOPS_OPTIONS, **spec.options}
    # a sample is held twice while generating (its text, then its row) plus ~50 bytes of Python object
    check_memory(f"listops with length={o['length']}, train={o['train']}, test={o['test']}",
                 (o["train"] + o["test"]) * (2 * o["length"] + 50), "use a shorter length or fewer samples")
    train = _listops_split(o["train"], o["length"], o["depth"], o["seed"], 0) if req.need_train else None
    test = _listops_split(o["test"], o["length"], o["depth"], o["seed"], 1)
    return Data("listops", "sequence", 10, 0, train, test, [str(i) for i in range(10)], vocab_size=256,
                pad_id=PAD_ID)


def load_textfolder(spec: DataSpec, req: Request) -> Data:
    tdir, held_out, classes = split_folders(spec.path, ("test", "val"), "text files", req.need_train)
    length = req.seq_len or 4096
    train = None if tdir is None else TensorSplit(*text_files(tdir, classes, length), transform=as_ids)
    test = TensorSplit(*text_files(held_out, classes, length), transform=as_ids)
    return Data("textfolder", "sequence", len(classes), 0, train, test, classes, vocab_size=256, pad_id=PAD_ID)


PARTSHAPES_OPTIONS = {"points": 1024, "train": 4000, "test": 1000, "seed": 0}


def load_partshapes(spec: DataSpec, req: Request) -> Data:
    opts = {**PARTSHAPES_OPTIONS, "points": req.points or PARTSHAPES_OPTIONS["points"], **spec.options}
    check_memory(f"partshapes with points={opts['points']}", opts["points"] * CLOUD_BYTES_PER_POINT,
                 "use fewer points")
    aug = PointAugment(rotate=True, scale=(0.8, 1.25), anisotropic=True, jitter=0.005) if req.augment else None
    train = PartShapesSplit(opts["train"], opts["points"], opts["seed"], 0, aug, req.seed) if req.need_train else None
    return Data("partshapes", "points", len(PART_NAMES), 3, train,
                PartShapesSplit(opts["test"], opts["points"], opts["seed"], 1), list(PART_NAMES), task="segment",
                category_parts=CATEGORY_PARTS)


SEGSCENES_OPTIONS = {"size": 32, "train": 4000, "test": 1000, "seed": 0}
SCENE_BYTES_PER_PIXEL = 512  # a scene's masks, textures and coordinates in float64 while drawing it; rounded up


def load_segscenes(spec: DataSpec, req: Request) -> Data:
    # a size option in the spec beats the model's img_size, which beats the default
    opts = {**SEGSCENES_OPTIONS, "size": req.img_size or SEGSCENES_OPTIONS["size"], **spec.options}
    check_memory(f"segscenes with size={opts['size']}", SCENE_BYTES_PER_PIXEL * opts["size"] ** 2,
                 "use a smaller size")
    train = SegScenesSplit(opts["train"], opts["size"], opts["seed"], 0, req.augment, req.seed) \
        if req.need_train else None
    return Data("segscenes", "image", len(SCENE_CLASSES), 3, train,
                SegScenesSplit(opts["test"], opts["size"], opts["seed"], 1), list(SCENE_CLASSES), task="segment")


def load_shapenetpart(spec: DataSpec, req: Request) -> Data:
    root = require_dir(spec.path, "PointNet's ShapeNetPart HDF5 files (*train*.h5, *val*.h5, *test*.h5)")
    # *val* files are trained on, as PointNet and its successors do (train + val, tested on test)
    found = {"train": sorted({*root.glob("*train*.h5"), *root.glob("*val*.h5")}),
             "test": sorted(root.glob("*test*.h5"))}
    for split, files in found.items():
        if not files and (split == "test" or req.need_train):
            raise FileNotFoundError(f"no *{split}*.h5 files in {root}: expected PointNet's ShapeNetPart HDF5 files "
                                    "(ply_data_train0.h5 ..., ply_data_val0.h5, ply_data_test0.h5 ...)")
    n = req.points or 2048
    aug = PointAugment(scale=(2 / 3, 3 / 2), anisotropic=True, translate=0.2) if req.augment else None
    train = TensorSplit(*shapenetpart_arrays(found["train"], n, 0), aug, None, req.seed) if req.need_train else None
    names = [f"{c.lower()}_{i}" for c, parts in SHAPENETPART_PARTS.items() for i in range(len(parts))]
    return Data("shapenetpart", "points", len(names), 3, train, TensorSplit(*shapenetpart_arrays(found["test"], n, 1)),
                names, task="segment", category_parts=tuple(SHAPENETPART_PARTS.values()))


def load_ade20k(spec: DataSpec, req: Request) -> Data:
    root = require_dir(spec.path, "ADE20K (ADEChallengeData2016/ or its parent, with images/ and annotations/)")
    root = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    size = req.img_size or 512
    check_memory(f"one image at img_size={size}", 64 * size * size, "use a model with a smaller img_size")
    classes, workers = ade20k_classes(root), min(8, _cpus())

    def split(name: str, train: bool) -> SegFolderSplit:
        images, labels = segmentation_pairs(root / "images" / name, root / "annotations" / name)
        check_images(images + labels, workers)
        return SegFolderSplit(images, labels, size, len(classes), -100, train and req.augment, req.seed)

    train = split("training", True) if req.need_train else None
    return Data("ade20k", "image", len(classes), 3, train, split("validation", False), classes, workers=workers,
                task="segment", ignore_index=-100)


def _cpus() -> int:
    # the CPUs this process may run on (a container or taskset may allow fewer than the machine has)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class InstalledSource(Source):
    """A path kind whose PATH may be left out: the bare kind reads `default_path`, where a system package
    installs the files."""

    default_path: Path = Path()

    def usage(self, kind: str) -> str:
        return f"{kind}[:PATH]"

    def parse(self, kind: str, rest: str) -> DataSpec | None:
        return super().parse(kind, rest) if rest.strip() else DataSpec(kind, self.default_path)


# The order is the order of the usage lines (SPECS) in help texts and errors.
TABLE: dict[str, Source] = {
    "digits": Source(load_digits, ("bixt_digits", {})),
    "shapes": Source(load_shapes, ("bixt_shapes", {}), options=SHAPES_OPTIONS, least={"seed": 0}),
    "imagefolder": Source(load_imagefolder, ("bixt_ti_l64_p16", {}), path=True),
    "cifar10": Source(functools.partial(load_cifar, CIFAR10), ("bixt_ti_l64_p16s4", {"img_size": 32}), path=True),
    "cifar100": Source(functools.partial(load_cifar, CIFAR100), ("bixt_ti_l64_p16s4", {"img_size": 32}), path=True),
    # 8x8 patches every 4 pixels (the overlap of bixt_digits' 4/2): 49 tokens, ~3x faster than stride 2's 196
    "fashion-mnist": InstalledSource(load_fashion_mnist, ("bixt_digits", {"img_size": 28, "patch_size": 8,
                                                                          "stride": 4}),
                                     path=True, default_path=FASHION_MNIST_DIR),
    "modelnet40": Source(load_modelnet40, ("bixt_ti_l64_points", {}), path=True),
    "listops": Source(load_listops, ("bixt_bytes", {}), options=LISTOPS_OPTIONS,
                      least={"seed": 0, "length": LISTOPS_MIN_LENGTH}, most={"depth": LISTOPS_MAX_DEPTH}),
    "textfolder": Source(load_textfolder, ("bixt_ti_l64_text", {}), path=True),
    # dense kinds: build_model reads dense_classes from Data.input_overrides (task "segment")
    # 256 points and 10 epochs: a few minutes on 2 cores with the defaults
    "partshapes": Source(load_partshapes, ("bixt_shapes", {"seq_len": 256}), recipe={"epochs": 10},
                         options=PARTSHAPES_OPTIONS, least={"seed": 0}),
    # 4x4 patches, no overlap: 64 tokens of a 32-pixel scene, small enough for CPU
    "segscenes": Source(load_segscenes, ("bixt_digits", {"img_size": 32, "in_chans": 3, "patch_size": 4, "stride": 4}),
                        recipe={"epochs": 15}, options=SEGSCENES_OPTIONS, least={"seed": 0}),
    "shapenetpart": Source(load_shapenetpart, ("bixt_ti_l64_points", {"seq_len": 2048}), path=True),
    "ade20k": Source(load_ade20k, ("bixt_ti_l64_p16s8", {"img_size": 512}), path=True),
}
SPECS = tuple(source.usage(kind) for kind, source in TABLE.items())
DEFAULT_MODELS = {kind: source.default_model for kind, source in TABLE.items()}
DEFAULT_RECIPES = {kind: dict(source.recipe) for kind, source in TABLE.items()}


def parse_spec(spec: str) -> DataSpec:
    """`digits`, `shapes:points=4096`, `imagefolder:/data/imagenet`, ... -> DataSpec (paths are not checked here)."""
    kind, _, rest = str(spec).partition(":")
    kind = kind.strip().lower()
    parsed = TABLE[kind].parse(kind, rest) if kind in TABLE else None
    if parsed is None:
        raise ValueError(f"unknown data spec {spec!r}: use one of {', '.join(SPECS)}")
    return parsed


def build_data(spec: str | DataSpec, *, img_size: int | None = None, points: int | None = None,
               seq_len: int | None = None, seed: int = 0, augment: bool = True, need_train: bool = True) -> Data:
    """Load or generate the data of `spec`, sized for a model: images resized to `img_size`, `points` per cloud,
    text files cut to `seq_len` bytes (ListOps has its own `length` option).

    `seed` drives the training augmentation; the data themselves (split, generated shapes) do not depend on it.
    """
    spec = spec if isinstance(spec, DataSpec) else parse_spec(spec)
    if spec.kind not in TABLE:
        raise ValueError(f"unknown data kind {spec.kind!r}: use one of {', '.join(SPECS)}")
    for name, value in (("img_size", img_size), ("points", points), ("seq_len", seq_len)):
        check_size(name, value)
    request = Request(img_size=img_size, points=points, seq_len=seq_len, seed=seed, augment=augment,
                      need_train=need_train)
    return TABLE[spec.kind].load(spec, request)
