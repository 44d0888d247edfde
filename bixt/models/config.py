"""What every model config shares (BiXT's, ViT's, the Perceiver's)."""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import asdict, dataclass
from typing import ClassVar

from bixt.nn.attention import check_backend
from bixt.nn.tokenizers import MODALITIES

# Declared field types (annotations are strings here) -> (accepts a value?, what the error calls it). numbers' ABCs
# take numpy's integers too (a class count read from data); bool is an int in Python, but `depth=true` is a mistake.
_TYPES = {
    "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
}
# Input fields every family reads: a zero stride or grid would fail as a ZeroDivisionError, a negative channel count
# as a tensor of negative size.
_POSITIVE_INPUT = ("img_size", "patch_size", "stride", "seq_len")
_NON_NEGATIVE_INPUT = ("in_chans", "vocab_size", "fourier_bands")


@dataclass(frozen=True)
class ModelConfig:
    """What every model config shares (BiXT's, ViT's, the Perceiver's): the input fields, named alike so that every
    model is handed the same tensors, the common body fields and their checks, and the `bixt models` summary."""

    # Input: which tokenizer, and the default input it is sized for.
    modality: str = "image"  # image | points | sequence
    in_chans: int = 3  # image channels; channels per point (xyz first); features per sequence token (0: ids)
    img_size: int = 224  # images: the default side; any multiple of the stride runs
    patch_size: int = 16
    stride: int = 16  # 16, 8, 4: the authors' /16, /8 and /4 tokenizers (overlapping 16 px patches)
    seq_len: int = 1024  # points / sequences: the default number of tokens
    vocab_size: int = 0  # sequences of integer ids
    fourier_bands: int = 16  # points: Fourier bands per coordinate
    max_freq: float = 32.0
    # Body.
    dim: int = 192
    heads: int = 6  # self-attention heads
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # bias of the fused qkv (and BiXT's r/v) projections
    layerscale: float | None = None  # LayerScale init value; None disables it
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear in depth from 0 to this
    attn_backend: str = "auto"
    num_classes: int = 1000  # 0: no classification head
    dense_classes: int = 0  # > 0: a per-token head (families without a token stream refuse it)

    _POSITIVE: ClassVar[tuple[str, ...]] = ("dim", "heads", "mlp_ratio")
    # Fields left None take the value of another attribute (e.g. BiXT's token_dim: the latents' dim). They are
    # resolved when the config is made, so each concept has one name; `replace` re-resolves the ones not given.
    _DEFAULT_FROM: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        given = frozenset(k for k in self._DEFAULT_FROM if getattr(self, k) is not None)
        object.__setattr__(self, "_given", given)
        for name, source in self._DEFAULT_FROM.items():
            if name not in given:
                object.__setattr__(self, name, getattr(self, source))
        self._check_types()
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}: choose one of {', '.join(MODALITIES)}")
        for name in (*self._POSITIVE, *_POSITIVE_INPUT):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in _NON_NEGATIVE_INPUT:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads={self.heads}: choose heads that divide it "
                             f"(e.g. {self.dim // 32 or 1} for head dim 32)")
        if self.num_classes < 0 or self.dense_classes < 0:
            raise ValueError("num_classes and dense_classes must be >= 0")
        check_backend(self.attn_backend)

    def _check_types(self) -> None:
        """Every field holds a value of its declared type. Overrides come from the command line (--model-arg
        depth=abc) and config files as YAML scalars; a wrong type would otherwise fail later, deep in the model's
        construction, as a TypeError. A float field takes an int, and a string YAML left unread ("1e-5")."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            declared = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            kinds = [k.strip() for k in declared.split("|")]
            if value is None and "None" in kinds:
                continue
            if "float" in kinds and isinstance(value, str):
                try:
                    value = float(value)
                    object.__setattr__(self, f.name, value)
                except ValueError:
                    pass
            known = [k for k in kinds if k in _TYPES]
            if known and not any(_TYPES[k][0](value) for k in known):
                raise ValueError(f"model arg {f.name} must be {' or '.join(_TYPES[k][1] for k in known)}, "
                                 f"got {value!r}")

    @property
    def default_tokens(self) -> int:
        return (self.img_size // self.stride) ** 2 if self.modality == "image" else self.seq_len

    def summary(self) -> dict:
        """The columns of `bixt models` (each config has a `depth`, as a field or a property)."""
        return {"modality": self.modality, "latents": getattr(self, "num_latents", "-"), "dim": self.dim,
                "depth": self.depth, "heads": self.heads, "tokens": self.default_tokens}

    def replace(self, owner: str | None = None, /, **changes) -> ModelConfig:
        """A copy with `changes` applied; defaulted fields (see _DEFAULT_FROM) follow their source again, so
        `cfg.replace(dim=256)` widens the tokens too unless token_dim was set. Unknown names raise a ValueError
        that names `owner` (e.g. the registered model), else the config class."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"{owner or type(self).__name__} has no option {', '.join(unknown)}: valid options are "
                             f"{', '.join(sorted(names))}")
        values = {k: getattr(self, k) for k in names}
        values.update({k: None for k in self._DEFAULT_FROM if k not in self._given})
        return type(self)(**{**values, **changes})

    def to_dict(self) -> dict:
        return asdict(self)
