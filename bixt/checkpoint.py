"""Reading and writing weights: this project's layout and the authors' (mrkshllr/BiXT), safely.

Nothing is unpickled beyond tensors and plain containers: `.safetensors` files, or `torch.load(weights_only=True)`
with only `argparse.Namespace` allowed besides (timm's training checkpoints store their arguments as one).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from bixt.atomic import atomic_path

POS_KEY = "tokenizer.pos_embed.pos"
_WRAPPERS = ("state_dict", "model", "model_ema", "state_dict_ema", "module")

# (authors' fragment, ours) of dotted key paths; applied in order, reversed for export.
_KEY_MAP = [
    ("patch_embed.proj", "tokenizer.proj"),
    ("fourier_pos_encode.token_projection", "tokenizer.pos_embed.proj"),
    ("fourier_pos_encode.pos", POS_KEY),
    ("blocks", "layers"),
    ("self_attention_latents", "latent"),
    ("cross_attention_latents_token", "cross"),
    ("norm1_lat", "norm_lat"),
    ("norm1_pat", "norm_tok"),
    ("norm2_lat", "mlp_norm_lat"),
    ("norm2_pat", "mlp_norm_tok"),
    ("rv_latents", "rv_lat"),
    ("r_latents", "r_lat"),
    ("rv_patches", "rv_tok"),
    ("proj_pat", "proj_tok"),
    ("mlp_pat", "mlp_tok"),
    ("ls1_pat", "ls1_tok"),
    ("ls2_pat", "ls2_tok"),
]


def _fragment(frag: str) -> re.Pattern:
    return re.compile(r"(?<![^.])" + re.escape(frag) + r"(?![^.])")  # whole dotted components only


_TO_OURS = [(_fragment(a), b) for a, b in _KEY_MAP]
_TO_OFFICIAL = [(_fragment(b), a) for a, b in reversed(_KEY_MAP)]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


def is_official_layout(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("blocks.", "patch_embed.", "fourier_pos_encode.")) for k in state)


def official_to_bixt(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {_rename(k, _TO_OURS): v for k, v in state.items()}


def bixt_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {_rename(k, _TO_OFFICIAL): v for k, v in state.items()}


def is_timm_vit_layout(state: Mapping[str, Tensor]) -> bool:
    """timm's VisionTransformer keys (DeiT's released checkpoints among them)."""
    return {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= state.keys()


def timm_vit_to_ours(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm's class-token ViT (e.g. deit_tiny_patch16_224) -> `baselines.vit`: the position table is split into the
    class token's entry and the patch grid's, the patch embedding moves under the tokenizer; blocks, norm and head
    keep their names (the same fused qkv layout: parts, heads, head_dim)."""
    other = [k for k in ("dist_token", "reg_token", "head_dist.weight", "fc_norm.weight") if k in state]
    if other:
        raise ValueError(f"this timm ViT has {', '.join(other)}: only the plain class-token ViT maps onto vit_* "
                         "(e.g. deit_tiny_patch16_224, not the distilled or register variants)")
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            out["cls_pos"], out["tokenizer.pos_embed.weight"] = value[:, :1], value[:, 1:]
        elif key.startswith("patch_embed.proj."):
            out["tokenizer.proj." + key.rsplit(".", 1)[1]] = value
        else:
            out[key] = value
    return out


def refusal(e: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only refusal that names the refused global (the rest is boilerplate)."""
    lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
    return (lines or str(e).strip().splitlines() or ["it holds objects other than tensors"])[0].strip()


def read_state_dict(source: str | os.PathLike | Mapping) -> dict[str, Tensor]:
    """A flat {name: tensor} dict from a path (.safetensors, .pt, .pth, .pth.tar) or a (wrapped) mapping."""
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist: check the path")
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
                with torch.serialization.safe_globals([argparse.Namespace]):
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(f"{path} holds more than tensors and was refused, not unpickled ({refusal(e)}): "
                                 "load only checkpoints you trust, converted to .safetensors") from None
            except (RuntimeError, EOFError, OSError) as e:
                raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
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


def likely_models(state: Mapping[str, Tensor]) -> list[str]:
    """Registered BiXT names whose weights have exactly these shapes (with num_classes=K when only the head
    differs); the stored positional grid, when present, narrows the choice to one tokenizer stride."""
    from bixt.registry import get_entry, list_models, resolve_config

    wanted = _shapes(state)
    pos = wanted.pop(POS_KEY, None)
    heads = {k: s for k, s in wanted.items() if k.startswith("head.")}
    classes = heads.get("head.weight", (0,))[0]
    found = []
    for name in list_models(family="bixt"):
        cfg = resolve_config(name, num_classes=classes) if classes else get_entry(name).config
        with torch.device("meta"):
            model = get_entry(name).build(cfg)
        have = _shapes(model.state_dict())
        have_pos = have.pop(POS_KEY, None)
        if have == wanted and (pos is None or have_pos == pos):
            default = get_entry(name).config.num_classes
            found.append(name if classes in (0, default) else f"{name} with num_classes={classes}")
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
    names = likely_models(state)
    hint = f"it fits {' or '.join(names)}" if names else "no registered BiXT has these shapes"
    raise ValueError(f"checkpoint does not fit this model: {'; '.join(problems)}; {hint}")


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping, strict: bool = True) -> nn.Module:
    """Load weights in this project's or the authors' layout into `model`; returns the model.

    The authors' stored positional grid (`fourier_pos_encode.pos`) is compared with the recomputed one; a model
    that recomputes its grid per input (the `_ft384` variants) drops it, as the authors do. With `strict`, any
    missing, unexpected or mis-shaped key raises a ValueError naming them and the likely right model.
    """
    state = read_state_dict(source)
    if is_official_layout(state):
        state = official_to_bixt(state)
    own = model.state_dict()
    if POS_KEY in state and POS_KEY not in own:
        state.pop(POS_KEY)
    elif POS_KEY in own:
        stored, recomputed = state.setdefault(POS_KEY, own[POS_KEY]), own[POS_KEY]
        comparable = stored.shape == recomputed.shape and not (stored.is_meta or recomputed.is_meta)
        if comparable and not torch.allclose(stored.float(), recomputed.float(), atol=1e-5):
            raise ValueError("the checkpoint's stored positional grid differs from the recomputed Fourier "
                             "features: the file is corrupt or not a BiXT checkpoint")
    if strict:
        _check_fit(model, state)
    model.load_state_dict(state, strict=strict)
    return model


def save_weights(state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write weights as safetensors atomically: a crash mid-write never leaves a broken file at `path`."""
    from safetensors.torch import save_file

    if isinstance(state, nn.Module):
        state = state.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
    return Path(path)
