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
    from bixt.models.registry import model_config

    mcfg = model_config(name, **model_args)
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
    return model_config(name, **model_args), data, model_args


def _check_fits(name: str, mcfg, data, spec) -> None:
    classes, chans = getattr(mcfg, "num_classes", 0), getattr(mcfg, "in_chans", data.in_chans)
    if classes < data.num_classes:
        raise ValueError(f"{name} predicts {classes} classes but {spec} has {data.num_classes}: "
                         "evaluate on data with at most that many classes")
    if chans != data.in_chans:
        raise ValueError(f"{name} takes {chans} input channels but {spec} gives {data.in_chans}: evaluate on "
                         f"data with {chans}")
    if getattr(mcfg, "vocab_size", 0) < data.vocab_size:
        raise ValueError(f"{name} embeds {getattr(mcfg, 'vocab_size', 0)} ids but {spec} uses "
                         f"{data.vocab_size}: evaluate a model trained on such data")
