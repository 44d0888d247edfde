"""One registry for every model the project builds: BiXT, its ablations and the baselines.

A family registers a table of named configs (frozen dataclasses), one builder and, if it reads foreign checkpoint
layouts, a checkpoint filter `fn(state_dict, model) -> state_dict` (timm's `checkpoint_filter_fn`; `model=None`:
rename keys only). `create_model(name, **overrides)` replaces fields of the named config and builds. The built-in
families register when the registry is first asked: BiXT's from `bixt.models.bixt`, the baselines from
`bixt_baselines` (the repository's `baselines/` folder), so `import bixt` stays light.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Modules that register families on import. Both are part of this project: a missing one is an error, not a skip.
FAMILY_MODULES = ("bixt.models.bixt", "bixt_baselines")

CheckpointFilter = Callable[[dict, "nn.Module | None"], dict]


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    family: str
    config: Any
    build: Callable[[Any], nn.Module]
    checkpoint_filter: CheckpointFilter | None = None


_REGISTRY: dict[str, Entry] = {}
_loaded = False


def register_family(family: str, configs: dict[str, Any], build: Callable[[Any], nn.Module], *,
                    checkpoint_filter: CheckpointFilter | None = None) -> None:
    for name, cfg in configs.items():
        if name in _REGISTRY and _REGISTRY[name].family != family:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = Entry(name, family, cfg, build, checkpoint_filter)


def _load_families() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in FAMILY_MODULES:
            importlib.import_module(module)


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered model names matching a shell-style pattern (as timm's list_models), optionally one family."""
    _load_families()
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatchcase(n, pattern) and (family is None or e.family == family))


def families() -> list[str]:
    _load_families()
    return sorted({e.family for e in _REGISTRY.values()})


def get_entry(name: str) -> Entry:
    _load_families()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `bixt models` to list them"
        raise ValueError(f"unknown model {name!r}: {hint}")
    return _REGISTRY[name]


def entry_for(model: nn.Module) -> Entry | None:
    """A registry entry of `model`'s family (the family whose builder made it; the first of its names), or None."""
    _load_families()
    return next((e for e in _REGISTRY.values() if e.build is type(model)), None)


def model_config(name: str, **overrides) -> Any:
    """The named config with `overrides` replacing fields (unknown names raise, listing the valid ones)."""
    return get_entry(name).config.replace(name, **overrides)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments replace fields of its config (e.g. num_classes=10)."""
    return get_entry(name).build(model_config(name, **overrides))


def count_params(name: str, **overrides) -> int:
    """Parameter count without allocating weights (the model is built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())
