"""What a `--data` SPEC asks for (DataSpec), what a loader returns (Data), and a data kind's table row (Source).

A kind's spec takes one of three forms, which its row declares: the bare kind (`digits`), the kind and a path
(`cifar10:PATH`), or the kind and integer options with defaults (`shapes:points=4096`). The row both parses the
argument and writes the kind's usage line, so the two cannot drift apart.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset


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
    classes: list[str]
    workers: int = 0  # DataLoader workers worth using (decoding files); in-memory sets need none
    vocab_size: int = 0  # sequences of ids: how many there are
    pad_id: int | None = None  # sequences of ids: the id that pads them, to be passed to the model as a mask

    @property
    def input_overrides(self) -> dict:
        ids = {"vocab_size": self.vocab_size} if self.vocab_size else {}
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
    overrides of its config), and the argument its spec takes: `path`, or `options` (their defaults; each at
    least its `least` entry, else 1), or neither."""

    load: Callable[[DataSpec, Request], Data]
    default_model: tuple[str, dict]
    path: bool = False
    options: Mapping[str, int] = field(default_factory=dict)
    least: Mapping[str, int] = field(default_factory=dict)

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
        options, usage = {}, ",".join(f"{k}=N" for k in self.options)
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in self.options or not re.fullmatch(r"\d+", value):
                raise ValueError(f"bad {kind} option {item!r}: use {kind}:{usage} with non-negative integers")
            options[key] = int(value)
        for key, value in options.items():
            least = self.least.get(key, 1)
            if value < least:
                raise ValueError(f"{kind} needs {key} >= {least}, got {value}")
        return DataSpec(kind, options=options)
