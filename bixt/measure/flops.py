"""Counting multiply-accumulates (MACs): fvcore with handles for every attention op, and a closed form per family.

Conventions (fvcore's, which the published counts use): one fused multiply-add is one MAC; counts are per sample
(batch 1). Linear layers, convolutions and matrix products are counted; layer norms as fvcore counts them (5 per
element with affine); elementwise ops (softmax, GELU, additions, scaling, positional features, resizing the
positional table) count 0 by convention and are filtered out of `unsupported`, so an op listed there is one that
really does something and was not counted (a red flag, not noise).

Attention cores are counted as the kernels compute them: q k^T and a v, L * S * (E + Ev) per head for L queries
over S keys, masks and causality ignored (as fvcore does for plain matmuls). On the `math` backend that is plain
matmuls; on `sdpa` fvcore sees `aten::scaled_dot_product_attention` (or a kernel variant), which it would count as
0 without the handle here; the `fused` and `triton` backends are each one autograd.Function (prim::PythonOp),
counted by the handle here. BiXT's two-sided attention computes its similarity matrix once on `math`, `fused` and
`triton` and twice on `sdpa` (two one-way calls), so the backends differ by M * N * d_attn per two-sided layer, and
each count is right for what runs. Headline figures (`bixt profile`'s and `bixt compare`'s `gmacs`, `bixt models`)
are the architecture's count in the paper's convention, one similarity matrix: the count on `math`, or on any
backend that counts the same (`counts_like_math`); the count of another backend that ran is reported beside it. The
split "attention" is the attention cores (SDPA, fused attention ops and the matmul / bmm / einsum products, which
in these models occur only there; linear layers trace as `aten::linear`); "rest" is everything else.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from math import prod
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from bixt.models.registry import count_params, get_entry
from bixt.nn import fused
from bixt.nn.attention import BiDirectionalCrossAttention
from bixt.nn.tokenizers import conv_stem_widths

Shape = list[int]

# Every SDPA entry point jit tracing can record: the public op and the per-kernel variants. All take q, k, v first.
SDPA_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
            "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_attention_math")
# Matrix products between two activations: in these models, attention only (see the module docstring).
PRODUCT_OPS = ("aten::matmul", "aten::bmm", "aten::baddbmm", "aten::einsum")
# Ops that count 0 MACs by convention: elementwise maths, reductions over one axis, lookups, interpolation.
ZERO_COST_OPS = frozenset(f"aten::{op}" for op in (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "pow", "sqrt", "rsqrt", "exp", "log",
    "sin", "cos", "tanh", "sigmoid", "softmax", "log_softmax", "gelu", "silu", "relu", "erf", "abs", "reciprocal",
    "mean", "sum", "amax", "masked_fill", "masked_fill_", "where", "embedding", "linspace", "repeat", "expand_as",
    "unflatten", "clone", "ne", "lt", "le", "logical_not", "feature_dropout", "native_dropout", "bernoulli_",
    "upsample_bicubic2d", "_upsample_bicubic2d_aa", "pad", "fill_", "normal_", "one_hot", "im2col", "meshgrid",
    "empty_like",
))


def attention_macs(q: Shape, k: Shape, v: Shape) -> int:
    """MACs of softmax(q k^T) v for q (..., L, E), k (..., S, E), v (..., S, Ev): L * S * (E + Ev) per batch entry.

    The batch/head dims are q's, so grouped-query attention (fewer k/v heads) is counted per query head.
    """
    *batch, L, E = q
    return prod(batch) * L * k[-2] * (E + v[-1])


def _shape(value) -> Shape:
    if not value.isCompleteTensor():
        raise ValueError("fvcore saw an attention op without complete shapes: trace with concrete tensors")
    return value.type().sizes()


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    return attention_macs(*(_shape(v) for v in inputs[:3]))


def baddbmm_flop_jit(inputs: list, outputs: list) -> int:
    (b, n, m), (_, _, p) = _shape(inputs[1]), _shape(inputs[2])  # inputs: self, batch1, batch2, beta, alpha
    return b * n * m * p


# A custom autograd.Function appears in a jit trace as prim::PythonOp.<Class>: the fused and triton backends' ops
# (named, not imported: importing the triton one needs triton; tests/test_triton.py checks the name).
FUSED_OP = f"prim::PythonOp.{fused.FusedBiDirectionalAttention.__name__}"
TRITON_OP = "prim::PythonOp.TritonBiDirectionalAttention"


def fused_flop_jit(inputs: list, outputs: list) -> int:
    """The fused or triton backend's op (FUSED_OP, TRITON_OP; the same computation and arguments): MACs of one call
    from the traced input shapes.

    jit records only the tensor arguments: r_lat, [v_lat], then r_tok and v_tok (4-D) or packed_tok (3-D, both
    halves), then [padding_mask]; four token-or-latent operands mean two-sided.
    """
    shapes = [v.type().sizes() for v in inputs if v.isCompleteTensor()]
    four, packed = [s for s in shapes if len(s) == 4], [s for s in shapes if len(s) == 3]
    operands = len(four) + 2 * len(packed)
    if not four or len(packed) > 1 or operands not in (3, 4):
        raise ValueError("a single-pass attention op traced with {len(shapes)} complete inputs of unexpected ranks: "
                         "trace with concrete tensors")
    (B, H, M, d), N = four[0], packed[0][1] if packed else four[-1][2]
    return fused.fused_macs(B, H, M, N, d, two_sided=operands == 4)


# The handles added to fvcore's defaults: every attention op of the backends, in this one place.
EXTRA_HANDLES: dict[str, Callable] = {
    **{op: sdpa_flop_jit for op in SDPA_OPS},
    "aten::baddbmm": baddbmm_flop_jit,
    FUSED_OP: fused_flop_jit,
    TRITON_OP: fused_flop_jit,
}
ATTENTION_OPS = frozenset((*SDPA_OPS, *PRODUCT_OPS, FUSED_OP, TRITON_OP))


@dataclasses.dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass of one sample."""

    total: int
    attention: int  # the attention cores (q k^T and a v)
    by_operator: dict[str, int] = dataclasses.field(default_factory=dict)
    unsupported: dict[str, int] = dataclasses.field(default_factory=dict)  # op -> occurrences, counted as 0

    @property
    def rest(self) -> int:
        return self.total - self.attention


def _short(op: str) -> str:
    return op.split("::", 1)[-1]


def count_macs(model: nn.Module, inputs: Any) -> MacCount:
    """fvcore's count of one forward of `model(*inputs)` with the attention handles; `inputs` a tensor or tuple.

    Runs the model once (jit trace) in eval mode without gradients. Count at batch 1 for MACs per sample: a few
    terms do not grow with the batch (BiXT's positional projection is computed once per grid). Work whose result
    is unused is dropped by the trace and not counted.
    """
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        fca = FlopCountAnalysis(model, inputs).set_op_handle(**EXTRA_HANDLES)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        fca.tracer_warnings("none")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about python values; the counts do not depend on it
            by_op = dict(fca.by_operator())
            unsupported = {op: n for op, n in fca.unsupported_ops().items() if op not in ZERO_COST_OPS}
    finally:
        model.train(was_training)
    attention_names = {_short(op) for op in ATTENTION_OPS}
    attention = sum(n for op, n in by_op.items() if op in attention_names)
    return MacCount(int(sum(by_op.values())), int(attention), {k: int(v) for k, v in by_op.items()}, unsupported)


# ---------------------------------------------------------------------------------------------------------------
# Closed forms, term by term as fvcore counts them (batch 1): Linear in * out per row, conv in * k * k * out per
# output position, LayerNorm 5 per element, BatchNorm (inference) 2 per element, attention L * S * (E + Ev) per head.
# They are an independent check of
# the traced count (tested to 2 %) and predict the cost of a configuration before it runs.


def _ln(rows: int, dim: int) -> int:
    return 5 * rows * dim


def _mlp(rows: int, dim: int, ratio: float) -> int:
    return 2 * rows * dim * int(dim * ratio)


def conv_stem_macs(in_chans: int, dim: int, patch_size: int, n: int) -> int:
    """The conv tokenizer (bixt.nn.tokenizers.ConvImageTokenizer) for n tokens of a square grid: each 3x3 stride-2
    conv stage in * 9 * out per output pixel, and its BatchNorm 2 per output element (fvcore's inference count)."""
    pixels, total, width_in = n * patch_size ** 2, 0, in_chans
    for width in conv_stem_widths(dim, patch_size):
        pixels //= 4  # each stage halves both sides
        total += pixels * width * (width_in * 9 + 2)
        width_in = width
    return total


def tokenizer_macs(cfg, n: int, dim: int, fourier_proj: bool) -> int:
    """The tokenizers of `bixt.nn.tokenizers` for n tokens; `fourier_proj`: the image 1x1 conv of the 64 Fourier
    channels (BiXT's positional encoding; ViT's learned table and the Perceiver's raw pixels cost nothing)."""
    if cfg.modality == "image":
        if getattr(cfg, "tokenizer", "patch") == "conv":  # only BiXT's config offers the conv stem
            stem = conv_stem_macs(cfg.in_chans, dim, cfg.patch_size, n)
        else:
            stem = n * dim * cfg.in_chans * cfg.patch_size ** 2
        return stem + (n * 64 * dim if fourier_proj else 0)
    if cfg.modality == "points":
        return n * dim * (cfg.in_chans + 3 * 2 * cfg.fourier_bands)
    return n * dim * cfg.in_chans  # ids: an embedding lookup, 0 MACs; features: one Linear


def self_block_macs(rows: int, dim: int, ratio: float) -> tuple[int, int]:
    """ViT-style block (BiXT's latent block): norms, fused qkv, attention, proj, MLP -> (total, attention)."""
    attn = rows * rows * 2 * dim
    return 2 * _ln(rows, dim) + rows * dim * 4 * dim + attn + _mlp(rows, dim, ratio), attn


def cross_block_macs(cfg, n: int, kind: str, backend: str, latents_used: bool = True) -> tuple[int, int]:
    """BiXT's cross block (bixt.models.bixt.CrossBlock) over M latents and n tokens -> (total, attention).

    kind: "one-sided" (only the latents read the tokens: BiXT's last layer, iterative attention, the Perceiver's
    cross-attend), "bidirectional" or "sequential". `latents_used=False`: the latents' update is never used (the
    last layer of a dense-only model); fvcore's trace drops that dead work, and so does this count.
    """
    M, d, dt, da, r = cfg.num_latents, cfg.dim, cfg.token_dim, cfg.attn_dim, cfg.mlp_ratio
    lat_update = M * da * d + _ln(M, d) + _mlp(M, d, r)  # proj_lat, the latents' MLP and its norm
    # Always: the latents' and the tokens' norms, the tokens' fused reference/key + value projection.
    total = _ln(M, d) + _ln(n, dt) + n * dt * 2 * da + (lat_update if latents_used else 0)
    if kind == "one-sided":  # r_lat / q_lat; q k^T and a v
        return total + M * d * da + 2 * M * n * da, 2 * M * n * da
    if kind == "sequential":  # q_lat; then q_tok, kv_lat, the norm of the updated latents; two full attentions
        attn = 4 * M * n * da
        total += M * d * da + n * dt * da + M * d * 2 * da + _ln(M, d)
    elif latents_used:  # rv_lat; one similarity matrix, built once (math, fused) or once per direction (two SDPA)
        attn = (3 if backend in SHARED_SCORE_BACKENDS else 4) * M * n * da
        total += M * d * 2 * da
    else:  # only the tokens' direction is live: one similarity and one value product
        attn = 2 * M * n * da
        total += M * d * 2 * da
    return total + attn + n * da * dt + _ln(n, dt) + _mlp(n, dt, r), attn  # + proj_tok and the tokens' MLP


def _head(cfg, rows: int) -> int:
    """Classifier on a pooled vector (norm over `rows` rows, then Linear; BiXT and Perceiver: the latents' mean)."""
    return _ln(rows, cfg.dim) + cfg.dim * cfg.num_classes


def bixt_macs(cfg, n: int, backend: str) -> tuple[int, int]:
    """BiXT and its ablations (`cross_attention`: bidirectional / sequential / iterative)."""
    total, attn = tokenizer_macs(cfg, n, cfg.token_dim, fourier_proj=True), 0
    dense_only = bool(cfg.dense_classes and not cfg.num_classes)
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        one_sided = not cfg.refines_tokens or (last and not cfg.two_sided_last)
        kind = "one-sided" if one_sided else cfg.cross_attention
        cross, cross_attn = cross_block_macs(cfg, n, kind, backend, latents_used=not (last and dense_only))
        total, attn = total + cross, attn + cross_attn
        if not (last and dense_only):
            latent, latent_attn = self_block_macs(cfg.num_latents, cfg.dim, cfg.mlp_ratio)
            total, attn = total + latent, attn + latent_attn
    if dense_only:  # per-token head on the token stream
        return total + _ln(n, cfg.token_dim) + n * cfg.token_dim * cfg.dense_classes, attn
    return total + _head(cfg, 1), attn


def vit_macs(cfg, n: int, backend: str) -> tuple[int, int]:
    """ViT / DeiT: a class token joins the n input tokens in every block; the final norm sees all of them."""
    t, d = n + 1, cfg.dim
    block, block_attn = self_block_macs(t, d, cfg.mlp_ratio)
    total = tokenizer_macs(cfg, n, d, fourier_proj=False) + cfg.depth * block + _ln(t, d)
    head = n * d * cfg.dense_classes if cfg.dense_classes and not cfg.num_classes else d * cfg.num_classes
    return total + head, cfg.depth * block_attn


def perceiver_macs(cfg, n: int, backend: str) -> tuple[int, int]:
    """Perceiver: `num_blocks` one-sided cross-attends (shared weights still cost MACs at every use), each followed
    by `self_per_block` latent blocks; the raw input tokens (pixels or patches + positions) are never updated."""
    cross, cross_attn = cross_block_macs(cfg, n, "one-sided", backend)
    latent, latent_attn = self_block_macs(cfg.num_latents, cfg.dim, cfg.mlp_ratio)
    reps, spb = cfg.num_blocks, cfg.self_per_block
    tokens = 0 if cfg.modality == "image" else tokenizer_macs(cfg, n, cfg.dim, fourier_proj=False)
    total, attn = tokens + reps * (cross + spb * latent), reps * (cross_attn + spb * latent_attn)
    if cfg.dense_classes and not cfg.num_classes:  # the Perceiver IO decoder instead of the pooled head
        d = cfg.dim
        # n queries read the latents: the one-sided cross block with the roles swapped (bixt_baselines' decoder_view)
        view = SimpleNamespace(num_latents=n, dim=d, token_dim=d, attn_dim=d, mlp_ratio=cfg.mlp_ratio)
        decoder, decoder_attn = cross_block_macs(view, cfg.num_latents, "one-sided", backend)
        query = 2 * (2 * cfg.fourier_bands + 1) if cfg.modality == "image" else d
        return (total + n * query * d + decoder + _ln(n, d) + n * d * cfg.dense_classes,
                attn + decoder_attn)
    return total + _head(cfg, 1), attn


# Backends that build the similarity matrix once for both directions of BiXT's attention.
SHARED_SCORE_BACKENDS = frozenset({"math", "fused", "triton"})
# The backend whose count is the architecture's (plain matmuls, one similarity matrix): the published convention.
ARCHITECTURE_BACKEND = "math"


def has_two_sided_attention(model: nn.Module) -> bool:
    """Whether the model holds a two-sided bi-directional attention, the one op whose count depends on the backend
    (one-way attention and sequential cross-attention count the same on every backend). Works on a meta model."""
    return any(isinstance(m, BiDirectionalCrossAttention) and not m.one_sided for m in model.modules())


def counts_like_math(backend: str | None, two_sided: bool) -> bool:
    """Whether a model counted on `backend` gives the architecture's count (None: a model without backends)."""
    return backend is None or backend in SHARED_SCORE_BACKENDS or not two_sided


# family -> closed form (config, tokens, counting backend) -> (total MACs, attention MACs) per sample.
ANALYTIC: dict[str, Callable[[Any, int, str], tuple[int, int]]] = {
    "bixt": bixt_macs,
    "bixt-ablation": bixt_macs,
    "vit": vit_macs,
    "perceiver": perceiver_macs,
}


def analytic_macs(family: str, cfg, n: int, backend: str) -> MacCount | None:
    """The closed-form count for a registered family, None where the family has none."""
    fn = ANALYTIC.get(family)
    if fn is None:
        return None
    total, attention = fn(cfg, n, backend)
    return MacCount(total, attention)


def model_summary(name: str) -> dict:
    """One row of `bixt models`: the family, the parameter count, GMACs per sample at the default input (closed
    form, the authors' one-similarity-matrix convention; fvcore agrees, see count_macs) and the config's summary."""
    entry = get_entry(name)
    summary = entry.config.summary()
    macs = analytic_macs(entry.family, entry.config, summary["tokens"], ARCHITECTURE_BACKEND)
    return {"name": name, "family": entry.family, "params": count_params(name),
            "gmacs": None if macs is None else round(macs.total / 1e9, 4), **summary}
