"""A model config and a data set sized for each other, for `bixt train` (a fresh model takes the data's classes
and input channels) and `bixt eval` (trained weights are checked against the data instead)."""
from __future__ import annotations

import dataclasses

from bixt.data import DEFAULT_MODELS, build_data, parse_spec
from bixt.train.config import TrainConfig


def resolve_model(cfg: TrainConfig) -> tuple[str, dict]:
    """The model name and its overrides: the data's default model when none is named."""
    if cfg.model is not None:
        return cfg.model, dict(cfg.model_args)
    name, args = DEFAULT_MODELS[parse_spec(cfg.data).kind]
    return name, {**args, **cfg.model_args}


def build_for_data(name: str, model_args: dict, data_spec: str, *, seed: int = 0, augment: bool = True,
                   need_train: bool = True, fit_data: bool = True):
    """(model config, data, overrides): the data sized for the model's input, the model's classes and input
    channels set from the data when `fit_data` (a fresh model), else checked against it (trained weights)."""
    mcfg = checked_config(name, model_args)
    modality = getattr(mcfg, "modality", "image")
    spec = parse_spec(data_spec)
    data = build_data(spec, img_size=getattr(mcfg, "img_size", None) if modality == "image" else None,
                      points=getattr(mcfg, "seq_len", None) if modality == "points" else None,
                      seq_len=getattr(mcfg, "seq_len", None) if modality == "sequence" else None,
                      seed=seed, augment=augment, need_train=need_train)
    if data.modality != modality:
        raise ValueError(f"{name} takes {modality} inputs but --data {spec} gives {data.modality}: choose a model "
                         f"for {data.modality} data (bixt models) or other data")
    fields = {f.name for f in dataclasses.fields(mcfg)}
    wanted = {k: v for k, v in data.input_overrides.items() if k in fields}
    if fit_data:
        model_args = {**model_args, **wanted}
    else:
        _check_fits(name, mcfg, data, spec)
    return checked_config(name, model_args), data, model_args


def checked_config(name: str, model_args: dict):
    """The registry's model_config, a wrongly typed model_args value (a config file's `depth: abc`) reported as a
    user error naming the key, not as the TypeError of whatever compares or multiplies it first."""
    from bixt.models.registry import model_config as config

    try:
        return config(name, **model_args)
    except TypeError as e:
        raise _type_error(name, model_args, e) from None


def build_model(name: str, mcfg, model_args: dict):
    """The registered model built from `mcfg`: a value of the right kind for the config can still be the wrong
    one for the layers (depth: 2.5), a user error too."""
    from bixt.models.registry import get_entry

    try:
        return get_entry(name).build(mcfg)
    except TypeError as e:
        raise _type_error(name, model_args, e) from None


def _type_error(name: str, model_args: dict, error: TypeError) -> ValueError:
    from bixt.models.registry import model_config as config

    types = {f.name: str(f.type) for f in dataclasses.fields(config(name))}
    for key, value in model_args.items():
        kinds = [k.strip() for k in types.get(key, "").split("|") if k.strip()]
        if kinds and not any(_is_kind(value, k) for k in kinds):
            return ValueError(f"model_args: {key} must be {' or '.join(kinds)}, got {value!r}: fix {key} in the "
                              f"config file's model_args (or --model-arg {key}=...)")
    return ValueError(f"model_args {model_args} do not fit {name} ({error}): give each field a value of the type "
                      "of its default")


def _is_kind(value, kind: str) -> bool:
    checks = {"int": lambda v: type(v) is int, "float": lambda v: type(v) in (int, float),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str), "None": lambda v: v is None}
    return checks[kind](value) if kind in checks else True  # a kind not listed here is taken on trust


def _check_fits(name: str, mcfg, data, spec) -> None:
    dense = data.task == "segment"  # per-token classes: the dense head's
    classes = getattr(mcfg, "dense_classes" if dense else "num_classes", 0)
    chans = getattr(mcfg, "in_chans", data.in_chans)
    if dense and not classes:
        raise ValueError(f"{name} has no per-token head but {spec} is a segmentation task: evaluate a model trained "
                         "on it (dense_classes > 0)")
    if classes < data.num_classes:
        raise ValueError(f"{name} predicts {classes} classes but {spec} has {data.num_classes}: "
                         "evaluate on data with at most that many classes")
    if chans != data.in_chans:
        raise ValueError(f"{name} takes {chans} input channels but {spec} gives {data.in_chans}: evaluate on "
                         f"data with {chans}")
    if getattr(mcfg, "vocab_size", 0) < data.vocab_size:
        raise ValueError(f"{name} embeds {getattr(mcfg, 'vocab_size', 0)} ids but {spec} uses "
                         f"{data.vocab_size}: evaluate a model trained on such data")
