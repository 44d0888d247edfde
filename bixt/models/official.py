"""Bridge to the authors' code (mrkshllr/BiXT, `timm/models/bixt.py` and, with the convolutional tokenizer,
`timm/models/bixt_convtok.py`): their checkpoint key layout (the BiXT families' `checkpoint_filter_fn`) and their
constructor arguments -> our config."""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from bixt.models.bixt_configs import BiXTConfig

POS_KEY = "tokenizer.pos_embed.pos"

# (authors' fragment, ours) of dotted key paths; applied in order, reversed for export. The conv tokenizer's stem
# keeps their indices below `proj` (patch_embed.proj.{2i}.{0: conv, 1: BatchNorm}), so one rule covers both.
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


def checkpoint_filter_fn(state: dict[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """The BiXT families' checkpoint filter: the authors' key layout -> ours (detected), then, for `model`, the
    stored positional grid: dropped for a model that recomputes its grid per input (the `_ft384` variants, as the
    authors do), filled in when absent, and compared with the recomputed Fourier features when both are there.
    `model=None`: rename the keys only."""
    if is_official_layout(state):
        state = official_to_bixt(state)
    if model is None:
        return state
    own = model.state_dict()
    state = as_dense_backbone(state, own)
    if POS_KEY in state and POS_KEY not in own:
        state.pop(POS_KEY)
    elif POS_KEY in own:
        stored, recomputed = state.setdefault(POS_KEY, own[POS_KEY]), own[POS_KEY]
        comparable = stored.shape == recomputed.shape and not (stored.is_meta or recomputed.is_meta)
        if comparable and not torch.allclose(stored.float(), recomputed.float(), atol=1e-5):
            raise ValueError("the checkpoint's stored positional grid differs from the recomputed Fourier "
                             "features: the file is corrupt or not a BiXT checkpoint")
    return state

def as_dense_backbone(state: dict[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The authors' dense use of their d13 classifiers: a dense model one layer shallower takes the classifier's
    weights without its last layer (one-sided: it updates only the latents) and its pooled head; the per-token head
    keeps the model's own initialisation, to be fine-tuned. Any other checkpoint passes unchanged."""
    depth = len({k.split(".")[1] for k in own if k.startswith("layers.")})
    last = f"layers.{depth}."
    one_more = any(k.startswith(last) for k in state) and not any(k.startswith(f"layers.{depth + 1}.") for k in state)
    if not (one_more and "dense_head.weight" in own and "dense_head.weight" not in state):
        return state
    kept = {k: v for k, v in state.items() if not k.startswith(last) and (k in own or not k.startswith("head."))}
    return {**kept, **{k: v for k, v in own.items() if k.startswith(("dense_head.", "dense_norm."))}}


# The authors' tokenizer classes (the start of `embed_layer`) -> (our `tokenizer`, stride as a fraction of the patch
# size). ConvPatchEmbed is `BiXTConvTok`'s (bixt_convtok.py); its other arguments are `BiXT`'s.
_TOKENIZERS = {"PatchEmbed": ("patch", 1), "PatchEmbedHalfStride": ("patch", 2),
               "PatchEmbedQuarterStride": ("patch", 4), "ConvPatchEmbed": ("conv", 1)}
_POSENC = {"fourier2d_embadd_proj": True, "fourier2d_embadd_proj_dyn": False}  # -> pos_buffer
# Arguments that change nothing we compute (init schemes, flags for their training script).
_IGNORED = {"weight_init", "latinit", "pretrained", "pretrained_strict", "pretrained_cfg", "block_fn",
            "norm_layer", "act_layer", "global_pool", "fc_norm"}
_RATES = ("drop_rate", "attn_drop_rate", "drop_path_rate")  # the authors set each per block type (sa_, ca_)


def config_from_official_args(args: dict) -> BiXTConfig:
    """Our config for the authors' `BiXT(**args)` or `BiXTConvTok(**args)` (as stored in the parity fixtures' JSON
    files; `embed_layer` tells them apart)."""
    a = {"img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000, "num_latents": 64,
         "embed_dim_lat": 192, "embed_dim_pat": None, "embed_dim_attn": None, "depth": 12, "sa_num_heads": 6,
         "ca_num_heads": 6, "sa_mlp_ratio": 4.0, "ca_lat_mlp_ratio": 4.0, "ca_pat_mlp_ratio": 4.0,
         "qkv_bias": True, "rv_bias": True, "init_values": None, "embed_layer": "PatchEmbed",
         "posenc_type_pat": "fourier2d_embadd_proj", "global_pool": "avg", "fc_norm": True, **args}
    unknown = sorted(set(a) - set(_known_args()))
    if unknown:
        raise ValueError(f"unsupported BiXT arguments {', '.join(unknown)}: this bridge knows "
                         f"{', '.join(sorted(_known_args()))}")
    if a["global_pool"] != "avg" or a["fc_norm"] is not True:
        raise ValueError("only the authors' default head (global_pool='avg', fc_norm=True) is supported")
    if a["qkv_bias"] != a["rv_bias"]:
        raise ValueError("qkv_bias and rv_bias must agree: one config flag covers both")
    if len({a["sa_mlp_ratio"], a["ca_lat_mlp_ratio"], a["ca_pat_mlp_ratio"]}) != 1:
        raise ValueError("differing MLP ratios per block are not supported: one mlp_ratio covers all")
    tokenizer = str(a["embed_layer"]).split()[0]
    if tokenizer not in _TOKENIZERS or a["posenc_type_pat"] not in _POSENC:
        raise ValueError(f"unsupported tokenizer {tokenizer!r} / positional encoding {a['posenc_type_pat']!r}: "
                         f"known are {', '.join(_TOKENIZERS)} / {', '.join(_POSENC)}")
    kind, stride_divisor = _TOKENIZERS[tokenizer]
    rates = {}
    for k in _RATES:
        sa, ca = a.get(f"sa_{k}", 0.0), a.get(f"ca_{k}", 0.0)
        if sa != ca:
            raise ValueError(f"sa_{k}={sa} and ca_{k}={ca} differ: one {k} covers both block types here")
        rates[k] = sa
    dim = a["embed_dim_lat"]
    return BiXTConfig(
        img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"],
        tokenizer=kind, stride=a["patch_size"] // stride_divisor, pos_buffer=_POSENC[a["posenc_type_pat"]],
        num_classes=a["num_classes"], num_latents=a["num_latents"], dim=dim,
        token_dim=None if a["embed_dim_pat"] in (None, dim) else a["embed_dim_pat"],
        attn_dim=None if a["embed_dim_attn"] in (None, dim) else a["embed_dim_attn"],
        depth=a["depth"], heads=a["sa_num_heads"],
        cross_heads=None if a["ca_num_heads"] == a["sa_num_heads"] else a["ca_num_heads"],
        mlp_ratio=float(a["sa_mlp_ratio"]), qkv_bias=bool(a["qkv_bias"]), layerscale=a["init_values"] or None,
        **rates)


def _known_args() -> set[str]:
    sides = {f"{s}_{k}" for s in ("sa", "ca") for k in _RATES}
    return sides | _IGNORED | {
        "img_size", "patch_size", "in_chans", "num_classes", "num_latents", "embed_dim_lat", "embed_dim_pat",
        "embed_dim_attn", "depth", "sa_num_heads", "ca_num_heads", "sa_mlp_ratio", "ca_lat_mlp_ratio",
        "ca_pat_mlp_ratio", "qkv_bias", "rv_bias", "init_values", "embed_layer", "posenc_type_pat"}


def build_from_official_args(args: dict) -> nn.Module:
    """This project's BiXT computing what the authors' `BiXT(**args)` computes (load their weights next)."""
    from bixt.models.bixt import BiXT  # bixt.models.bixt registers this module's filter: import it late

    return BiXT(config_from_official_args(args))
