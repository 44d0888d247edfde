"""Reading and writing weights, safely; each family's own layouts through the filter it registered.

Nothing is unpickled beyond tensors and plain containers: `.safetensors` files, or `torch.load(weights_only=True)`
with only `argparse.Namespace` allowed besides (timm's training checkpoints store their arguments as one).
Foreign key layouts (the authors' BiXT, timm's ViT) are the business of the family's `checkpoint_filter`
(registered with `register_family`, kept beside the model as timm keeps `checkpoint_filter_fn`).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from bixt.io.atomic import atomic_path
from bixt.models.registry import entry_for, get_entry, list_models

_WRAPPERS = ("state_dict", "model", "model_ema", "state_dict_ema", "module")
FORMATS = "a .safetensors file or one written by torch.save (.pt, .pth, .pth.tar)"


def refusal(e: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only refusal that names the refused global (the rest is boilerplate)."""
    lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
    return (lines or str(e).strip().splitlines() or ["it holds objects other than tensors"])[0].strip()


def torch_load(path: Path, allowed: list | None = None):
    """torch.load with weights_only=True (only tensors, plain containers and `allowed` classes are rebuilt; anything
    else raises pickle.UnpicklingError). torch's warning about an unexpected pickle protocol is silenced: such a
    file is either read safely or refused with an error, and the warning would only add lines to that error."""
    with warnings.catch_warnings(), torch.serialization.safe_globals(allowed or []):
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(source: str | os.PathLike | Mapping) -> dict[str, Tensor]:
    """A flat {name: tensor} dict from a path (.safetensors, .pt, .pth, .pth.tar) or a (wrapped) mapping."""
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if path.is_dir():
            raise IsADirectoryError(f"checkpoint {path} is a folder: give a weights file (.safetensors, .pt, .pth)")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist: check the path")
        if path.stat().st_size == 0:  # an interrupted copy or download; torch.load would fail with an IndexError
            raise ValueError(f"checkpoint {path} is empty (0 bytes): re-save or re-download it")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(path)
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path} is not a readable safetensors file ({e}): re-save or re-download it") \
                    from None
        else:
            try:
                state = torch_load(path, allowed=[argparse.Namespace])
            except pickle.UnpicklingError as e:
                if "GLOBAL" not in str(e):  # an opcode the safe unpickler does not read: not torch.save's output
                    raise ValueError(f"{path} is not a readable PyTorch checkpoint ({refusal(e)}): expected "
                                     f"{FORMATS}") from None
                raise ValueError(f"{path} holds more than tensors and was refused, not unpickled ({refusal(e)}): "
                                 "load only checkpoints you trust, converted to .safetensors") from None
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 -- a truncated or foreign file fails in any of the (safe)
                # unpickler's ways (EOFError, IndexError, KeyError, struct.error...): all mean "not readable"
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}): it is "
                                 f"truncated or not {FORMATS}") from None
    while isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"no state dict found in the checkpoint (top-level keys: {', '.join(map(str, state))}):"
                             f" expected tensors, possibly under one of {', '.join(_WRAPPERS)}")
        state = inner
    if not isinstance(state, Mapping):
        raise ValueError(f"the checkpoint holds a {type(state).__name__}, not a state dict")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _shapes(state: Mapping[str, Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def likely_models(state: Mapping[str, Tensor], family: str = "bixt") -> list[str]:
    """Registered names of `family` whose weights have exactly these shapes (with num_classes=K when only the head
    differs), after the family's key renaming. A stored buffer must be one the model has, with its shape (BiXT's
    positional grid tells the strides apart); a buffer the model recomputes may be absent from the file."""
    names = list_models(family=family)
    filter_fn = get_entry(names[0]).checkpoint_filter if names else None
    wanted = _shapes(filter_fn(dict(state)) if filter_fn else state)
    classes = wanted.get("head.weight", (0,))[0]
    found = []
    for name in names:
        entry = get_entry(name)
        with torch.device("meta"):
            model = entry.build(entry.config.replace(num_classes=classes) if classes else entry.config)
        have, buffers = _shapes(model.state_dict()), {k for k, _ in model.named_buffers()}
        if all(have.get(k) == s for k, s in wanted.items()) and all(k in wanted or k in buffers for k in have):
            found.append(name if classes in (0, entry.config.num_classes) else f"{name} with num_classes={classes}")
    return found


def _check_fit(model: nn.Module, state: dict[str, Tensor]) -> None:
    own = _shapes(model.state_dict())
    got = _shapes(state)
    missing = sorted(own.keys() - got.keys())
    unexpected = sorted(got.keys() - own.keys())
    mismatched = sorted(f"{k} {got[k]} vs {own[k]}" for k in own.keys() & got.keys() if own[k] != got[k])
    if not (missing or unexpected or mismatched):
        return

    def head(items):
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    problems = [f"{label} [{head(items)}]" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                if items]
    entry = entry_for(model)
    names = likely_models(state, entry.family) if entry is not None else []
    hint = f"it fits {' or '.join(names)}" if names else f"no registered {type(model).__name__} has these shapes"
    raise ValueError(f"checkpoint does not fit this model: {'; '.join(problems)}; {hint}")


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping, strict: bool = True) -> nn.Module:
    """Load weights into `model`; returns the model. Any layout the model's family knows is accepted (its registered
    checkpoint filter renames and checks the keys: the authors' BiXT layout, timm's ViT layout). With `strict`, any
    missing, unexpected or mis-shaped key raises a ValueError naming them and the registered model they fit."""
    state = read_state_dict(source)
    entry = entry_for(model)
    if entry is not None and entry.checkpoint_filter is not None:
        state = entry.checkpoint_filter(state, model)
    if strict:
        _check_fit(model, state)
    model.load_state_dict(state, strict=strict)
    return model


def save_weights(state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write weights as safetensors atomically: a crash mid-write never leaves a broken file at `path`."""
    from safetensors.torch import save_file

    if isinstance(state, nn.Module):
        state = state.state_dict()
    from safetensors import SafetensorError

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp)
        except SafetensorError as e:  # safetensors reports a failed write (a full disk) as its own error
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
    return Path(path)
