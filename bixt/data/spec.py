"""What a `--data` SPEC asks for (DataSpec), what a loader returns (Data), and a data kind's table row (Source).

A kind's spec takes one of three forms, which its row declares: the bare kind (`digits`), the kind and a path
(`cifar10:PATH`), or the kind and integer options with defaults (`shapes:points=4096`). The row both parses the
argument and writes the kind's usage line, so the two cannot drift apart.

`category_of` tells a part-segmentation sample's object category from its labels.

Also the limits every loader checks before allocating (a spec's numbers, the sizes a model asks for, memory), and
`check_same_classes`, which tells whether two data sets' labels mean the same classes.
"""
from __future__ import annotations

import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

MAX_OPTION = 2**31 - 1  # a count or size beyond this is a typo, not a data set (and overflows int32 indexing)
GIB = 2**30


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: Path | None = None
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.kind}:{self.path}"
        return self.kind + (":" + ",".join(f"{k}={v}" for k, v in self.options.items()) if self.options else "")


@dataclass
class Data:
    """A data set ready to train or evaluate on: two splits (train may be None) and what a model needs to know."""

    name: str
    modality: str  # image | points | sequence
    num_classes: int
    in_chans: int  # 0: integer ids
    train: Dataset | None
    test: Dataset
    classes: list[str]  # the class names in label order (check_same_classes compares two data sets' names)
    workers: int = 0  # DataLoader workers worth using (decoding files); in-memory sets need none
    vocab_size: int = 0  # sequences of ids: how many there are
    pad_id: int | None = None  # sequences of ids: the id that pads them, to be passed to the model as a mask
    # Dense prediction (task "segment"): a sample is (x, y) with one label per point, y (N,), or per pixel, y (H, W),
    # int64; num_classes and classes are the part / semantic classes. Labels equal to ignore_index (void pixels,
    # padding points) are never trained on or counted.
    task: str = "classify"  # classify | segment
    ignore_index: int = -100  # torch's cross_entropy default, so the loss can take it as it is
    # part segmentation: for each object category the global part ids it owns (each part in exactly one category);
    # a sample's category is the one owning its labels (category_of), so samples need no third element
    category_parts: tuple[tuple[int, ...], ...] | None = None

    @property
    def input_overrides(self) -> dict:
        ids = {"vocab_size": self.vocab_size} if self.vocab_size else {}
        if self.task == "segment":
            # a dense-only model (no classification head): model(x) gives per-token logits (B, tokens, classes)
            return {"num_classes": 0, "dense_classes": self.num_classes, "in_chans": self.in_chans, **ids}
        return {"num_classes": self.num_classes, "in_chans": self.in_chans, **ids}


@dataclass(frozen=True)
class Request:
    """What `build_data` passes every loader: the sizes a model wants and how the training split is served."""

    img_size: int | None = None  # images resized to this side; None: as stored
    points: int | None = None  # points per cloud; None: the kind's default
    seq_len: int | None = None  # bytes per text file; None: the kind's default
    seed: int = 0  # drives the training augmentation only, never the data themselves
    augment: bool = True
    need_train: bool = True  # False: the train split is neither read nor generated (evaluation)


@dataclass(frozen=True)
class Source:
    """One data kind: `load(spec, request) -> Data`, the model it trains when --model is not given (name,
    overrides of its config), the training options it defaults (`recipe`), and the argument its spec takes:
    `path`, or `options` (their defaults; each at least its `least` entry, else 1, and at most its `most` entry,
    else MAX_OPTION), or neither."""

    load: Callable[[DataSpec, Request], Data]
    default_model: tuple[str, dict]
    # training defaults of this kind, under any option given (e.g. fewer epochs where an epoch is long on a CPU)
    recipe: Mapping[str, object] = field(default_factory=dict)
    path: bool = False
    options: Mapping[str, int] = field(default_factory=dict)
    least: Mapping[str, int] = field(default_factory=dict)
    most: Mapping[str, int] = field(default_factory=dict)

    def usage(self, kind: str) -> str:
        if self.path:
            return f"{kind}:PATH"
        if self.options:
            return f"{kind}[:{','.join(f'{k}=N' for k in self.options)}]"
        return kind

    def parse(self, kind: str, rest: str) -> DataSpec | None:
        """The spec `kind:rest` (rest "" without a colon); None when this kind takes no such argument."""
        if self.path:
            if not rest:
                raise ValueError(f"--data {kind} needs a path: use {kind}:PATH")
            return DataSpec(kind, Path(rest).expanduser())
        if not self.options:
            return None if rest else DataSpec(kind)
        options, usage = {}, f"{kind}:{','.join(f'{k}=N' for k in self.options)}"
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, _, value = (part.strip() for part in item.partition("="))
            if key not in self.options:
                raise ValueError(f"bad {kind} option {item!r}: {kind} has no option {key!r}, use {usage}")
            if key in options:
                raise ValueError(f"--data key {key!r} given twice in {kind}:{rest}: give each key once")
            options[key] = self._number(kind, key, value)
        return DataSpec(kind, options=options)

    def _number(self, kind: str, key: str, value: str) -> int:
        least, most = self.least.get(key, 1), self.most.get(key, MAX_OPTION)
        if not re.fullmatch(r"[0-9]+", value):
            raise ValueError(f"bad {kind} option {key}={value!r}: {key} takes a whole number from {least} to {most}")
        # compared as digits first: int() refuses strings over 4,300 digits with an error of its own
        if len(value.lstrip("0")) > len(str(most)) or int(value) > most:
            shown = value if len(value) <= 20 else f"{value[:8]}...({len(value)} digits)"
            raise ValueError(f"{kind} {key}={shown} is too large: use {key} <= {most}")
        if int(value) < least:
            raise ValueError(f"{kind} needs {key} >= {least}, got {int(value)}: use {key}={least} or more")
        return int(value)


# ----------------------------------------------------------------------------------------------------- limits
def memory_bytes() -> int | None:
    """The memory this process may use: physical memory, or a container's (cgroup v2) limit when lower; None
    where the system does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(cap)) if cap.isdigit() else total


def check_memory(what: str, nbytes: float, fix: str) -> None:
    """Refuse data that cannot fit in memory before allocating it: numpy and torch would fail midway with a
    MemoryError traceback (or the system would start killing processes)."""
    limit = memory_bytes()
    if limit is not None and nbytes > limit:
        raise ValueError(f"{what} needs about {nbytes / GIB:,.1f} GiB of memory, more than this machine's "
                         f"{limit / GIB:,.1f} GiB: {fix}")


def check_size(name: str, value: int | None) -> None:
    """A size a model asks the data for (img_size, points, seq_len): None or a whole number in 1..MAX_OPTION."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's integers too
    if value is not None and not (whole and 1 <= value <= MAX_OPTION):
        raise ValueError(f"the model's {name}={value!r} is not a usable size: set {name} to a whole number from 1 "
                         f"to {MAX_OPTION} (--model-arg {name}=N)")


def check_same_classes(expected: Sequence[str], found: Sequence[str]) -> None:
    """Refuse data whose label i is not the class i a model was trained on: `expected` are the training data's
    class names in label order, `found` the data's (`Data.classes`). Fewer classes pass when they are the first
    ones, since then every label still means the same class."""
    expected, found = [str(c) for c in expected], [str(c) for c in found]
    if len(found) > len(expected):
        raise ValueError(f"the data has {len(found)} classes but the model was trained on {len(expected)}: "
                         "evaluate on data with the classes the model was trained on")
    for i, (want, got) in enumerate(zip(expected, found, strict=False)):
        if want != got:
            raise ValueError(f"the data's class {i} is {got!r} but the model's class {i} is {want!r}: evaluate on "
                             "data with the class folders (names) the model was trained on")


# ----------------------------------------------------------------------------------------------------- dense
def check_category_parts(category_parts: Sequence[Sequence[int]], num_classes: int) -> None:
    """Every part id 0..num_classes-1 belongs to exactly one category: otherwise a sample's category is ambiguous."""
    owners = [0] * num_classes
    for parts in category_parts:
        for p in parts:
            if not 0 <= p < num_classes:
                raise ValueError(f"category_parts names part {p}, outside 0..{num_classes - 1}: fix the table")
            owners[p] += 1
    wrong = [p for p, n in enumerate(owners) if n != 1]
    if wrong:
        raise ValueError(f"part {wrong[0]} belongs to {owners[wrong[0]]} categories in category_parts: give every "
                         "part exactly one category")


def part_owner(category_parts: Sequence[Sequence[int]]) -> Tensor:
    """(parts,) int64: the category owning each part id."""
    owner = torch.full((1 + max(p for parts in category_parts for p in parts),), -1, dtype=torch.long)
    for c, parts in enumerate(category_parts):
        owner[list(parts)] = c
    return owner


def category_of(labels: Tensor, category_parts: Sequence[Sequence[int]], ignore_index: int = -100) -> Tensor:
    """The object category of part-labelled samples: labels (..., N) -> (...) int64, the category owning the first
    non-void label of each sample; -1 for a sample whose labels are all void (it has no category to score)."""
    labels = torch.as_tensor(labels)
    owner = part_owner(category_parts).to(labels.device)
    valid = labels != ignore_index
    first = valid.long().argmax(-1, keepdim=True)  # the first non-void label (0 where there is none)
    label = labels.gather(-1, first).squeeze(-1)
    cat = owner[label.clamp(0, len(owner) - 1)]
    return torch.where(valid.any(-1) & (label >= 0) & (label < len(owner)), cat, torch.full_like(cat, -1))
