"""One registry for every model the project builds: BiXT, its ablations and the baselines.

A family registers a table of named configs (frozen dataclasses) and one builder; `create_model(name, **overrides)`
replaces fields of the named config and builds. Packages listed in `PLUGINS` register their families when first
needed, so `import bixt` stays light and `bixt.create_model("vit_ti_p16")` still works.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

PLUGINS = ("baselines",)


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    family: str
    config: Any
    build: Callable[[Any], nn.Module]


_REGISTRY: dict[str, Entry] = {}
_plugins_loaded = False


def register_family(family: str, configs: dict[str, Any], build: Callable[[Any], nn.Module]) -> None:
    for name, cfg in configs.items():
        if name in _REGISTRY and _REGISTRY[name].family != family:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = Entry(name, family, cfg, build)


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for module in PLUGINS:
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered model names matching a shell-style pattern (as timm's list_models), optionally one family."""
    _load_plugins()
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatchcase(n, pattern) and (family is None or e.family == family))


def families() -> list[str]:
    _load_plugins()
    return sorted({e.family for e in _REGISTRY.values()})


def get_entry(name: str) -> Entry:
    _load_plugins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `bixt models` to list them"
        raise ValueError(f"unknown model {name!r}: {hint}")
    return _REGISTRY[name]


def resolve_config(name: str, **overrides) -> Any:
    entry = get_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}: valid options are {', '.join(sorted(fields))}")
    return dataclasses.replace(entry.config, **overrides)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments replace fields of its config (e.g. num_classes=10)."""
    return get_entry(name).build(resolve_config(name, **overrides))


def count_params(name: str, **overrides) -> int:
    """Parameter count without allocating weights (the model is built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())


def model_summary(name: str) -> dict:
    """One row of `bixt models`: the family, the parameter count, GMACs per sample at the default input (closed
    form, the authors' one-similarity-matrix convention; fvcore agrees, see bixt.flops) and the config's summary."""
    from bixt.flops import analytic_macs

    entry = get_entry(name)
    summary = entry.config.summary()
    macs = analytic_macs(entry.family, entry.config, summary["tokens"], "math")
    return {"name": name, "family": entry.family, "params": count_params(name),
            "gmacs": None if macs is None else round(macs.total / 1e9, 4), **summary}
