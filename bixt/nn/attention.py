"""Attention math for BiXT and the baselines: one-way attention and bi-directional cross-attention.

Bi-directional cross-attention (BiXT, section 1 of BIXT-FACTS.md): latents and tokens each project to a
"reference" R and a value V; ONE similarity matrix A = R_lat R_tok^T * scale (B x H x M x N) is softmaxed
over tokens to update the latents and over latents to update the tokens.

Backends, chosen by name:
  math      A materialised once, both softmaxes taken from it: the authors' computation.
  sdpa      two `scaled_dot_product_attention` calls with the roles swapped. No M x N tensor is kept,
            at the price of computing R_lat R_tok^T twice; the fused kernels make it the fastest on CPU.
  xformers  the same two calls through xformers' memory-efficient kernel. CUDA only, imported lazily.
  fused     bi-directional attention in one pass over token chunks: A computed once, never kept whole
            (bixt/nn/fused.py). No attention dropout. One-way attention (latent self-attention) runs on sdpa.
  triton    the fused algorithm as Triton GPU kernels (bixt/nn/triton_attention.py), CUDA only (CPU tensors only
            under TRITON_INTERPRET=1). No attention dropout; one-way attention runs on sdpa.
  auto      the fastest available for the tensor's device, dtype and shape (`auto_bidirectional`; on CPU the one
            `bixt tune` measured fastest on this machine, bixt/nn/autotune.py). One-way: sdpa, except math in
            bf16 on a CPU over few keys (`CPU_BF16_RULE`).

Token sharding (bixt/nn/sharding.py): with a `shard`, the tokens (keys) are this process's part of the samples'
tokens and the latents' softmax runs over all processes' tokens; math and fused (CPU) compute it.

Padding masks are (B, N) bool with True marking padding (as `key_padding_mask` in torch): a padded token
gives nothing to the latents. Padded tokens still receive an update themselves; callers ignore it.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bixt.nn import autotune
from bixt.nn.fused import fused_bidirectional_attention, fused_wins
from bixt.nn.layers import split_heads
from bixt.nn.linear import Linear
from bixt.nn.sharding import TokenShard, check_shard_backend, softmax_over_shards

BACKENDS = ("auto", "math", "sdpa", "xformers", "fused", "triton")
# Tokens PER SAMPLE from which `auto` runs bi-directional attention on triton on CUDA, by (a backward pass follows,
# half precision). Flash SDPA is weak exactly where a sample's tokens are many: the latents' direction is M = 64
# queries over N keys, a single query block per head, and its backward is worse still; many short samples keep it
# busy. Measured on an H200 (benchmarks/bench_triton.py, benchmarks/results/triton_h200_{a,b}.json): bf16 training
# 0.96x at 16,384 tokens, 2.3x at 65,536; fp32 (no flash kernel) training 1.26x from 4,096, inference 1.38x at
# 16,384; bf16 inference 0.50x at 65,536 and 1.12x at 2^20, so it stays on flash.
_TRITON_MIN_TOKENS = {(True, True): 32_768, (True, False): 4_096, (False, True): None, (False, False): 16_384}


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


@functools.cache
def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend `name` stands for on this device and dtype; raises when it cannot run there."""
    check_backend(name)
    if name == "xformers":
        if device.type != "cuda":
            raise ValueError(f"the xformers backend runs on CUDA only (tensor is on {device.type}): "
                             "use backend 'sdpa' or 'auto'")
        if not xformers_available():
            raise ValueError("the xformers backend needs the xformers package: pip install 'bixt[xformers]', "
                             "or use backend 'sdpa'")
    if name == "triton":
        if not triton_available():
            raise ValueError("the triton backend needs the triton package: pip install 'bixt[triton]' (Linux), "
                             "or use backend 'auto'")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(f"the triton backend runs on CUDA (tensor is on {device.type}): use backend 'auto', "
                             "or set TRITON_INTERPRET=1 to run its kernels interpreted (slow; for tests)")
    # auto's one-way choice is sdpa (bar `attention`'s bf16 case on a CPU, which needs the keys' length): on CUDA
    # torch dispatches it to FlashAttention, which leaves xformers nothing to add by default (it stays available).
    return name if name != "auto" else "sdpa"


def auto_bidirectional(device: torch.device, dtype: torch.dtype, batch: int, tokens: int,
                       training: bool) -> str | None:
    """The backend `auto` runs bi-directional attention on for `batch` samples of `tokens` tokens, or None for
    auto's one-way choice (sdpa). `training`: whether a backward pass follows.

    CUDA: triton from `_TRITON_MIN_TOKENS` tokens per sample. CPU, float32 or bf16: the fastest of sdpa, math and
    fused at the nearest shape `bixt tune` measured on this machine for the dtype (`bixt.nn.autotune`); without
    that, in float32 fused where `fused_wins` says (tokens in the batch), else sdpa; in bf16 `_cpu_bf16_choice`."""
    if device.type == "cuda":
        if dtype not in (torch.float16, torch.bfloat16, torch.float32) or not triton_available():
            return None
        least = _TRITON_MIN_TOKENS[training, dtype != torch.float32]
        return "triton" if least is not None and tokens >= least else None
    tuned = autotune.choose(training, batch, tokens, device.type, dtype) \
        if dtype in (torch.float32, torch.bfloat16) else None
    if tuned is None and dtype == torch.bfloat16:
        tuned = _cpu_bf16_choice(batch, tokens, training)
    if tuned is not None:
        return None if tuned == "sdpa" else tuned
    return "fused" if fused_wins(device, dtype, batch * tokens, training) else None


# auto's bf16 rule on a CPU that `bixt tune --dtype bf16` has not measured (`_cpu_bf16_choice`).
# One-way attention (the latents' self-attention) in bf16 on a CPU: math below this many keys, sdpa from there
# (sdpa's bf16 backward at 32 x 64 latents took 3.5x math's; at 1,024 keys math took 1.8x sdpa).
CPU_BF16_RULE = {"train_math_below": 32768, "infer_fused_from": 5120, "infer_math_from_batch": 4,
                 "one_way_math_below": 512}


def _cpu_bf16_choice(batch: int, tokens: int, training: bool) -> str:
    """math's bf16 matmuls where sdpa's bf16 backward is 1.4-4x slower (and fused computes in float32), below
    32,768 tokens per sample in training; in inference fused from 5,120 tokens, math for batches of 4 or more shorter
    samples, sdpa for fewer. Measured on a 2-core AMD EPYC with AVX512-BF16 (`bixt tune --dtype bf16`,
    benchmarks/results/tune_epyc_2t_bf16.json); other processors differ, hence the tune."""
    rule = CPU_BF16_RULE
    if training:
        return "math" if tokens < rule["train_math_below"] else "fused"
    if tokens >= rule["infer_fused_from"]:
        return "fused"
    return "math" if batch >= rule["infer_math_from_batch"] else "sdpa"


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, key_padding_mask: Tensor | None,
                        dropout_p: float) -> Tensor:
    import xformers.ops as xops

    bias = None
    if key_padding_mask is not None:
        # xformers wants a bias whose last dim is padded to a multiple of 8 in memory; slicing keeps the view.
        B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        bias = q.new_zeros(B, H, L, (S + 7) // 8 * 8)[..., :S]
        bias.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def _probs(scores: Tensor, key_padding_mask: Tensor | None, dropout_p: float) -> Tensor:
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return F.dropout(probs, dropout_p) if dropout_p > 0 else probs


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
              key_padding_mask: Tensor | None = None, dropout_p: float = 0.0, backend: str = "auto",
              shard: TokenShard | None = None) -> Tensor:
    """softmax(q k^T * scale) v for (B, H, L, d) tensors; `dropout_p` applies to the probabilities. `shard`: k
    and v are this process's part of the keys, the softmax runs over all processes' keys."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if shard is not None:
        check_shard_backend(backend)
        return softmax_over_shards((q @ k.transpose(-2, -1)) * scale, v, shard, key_padding_mask, dropout_p)
    name = resolve_backend(backend, q.device, q.dtype)
    if (backend == "auto" and q.device.type == "cpu" and q.dtype == torch.bfloat16
            and k.shape[-2] < CPU_BF16_RULE["one_way_math_below"]):
        name = "math"
    if name == "math":
        return _probs((q @ k.transpose(-2, -1)) * scale, key_padding_mask, dropout_p) @ v
    if name == "xformers":
        return _xformers_attention(q, k, v, scale, key_padding_mask, dropout_p)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def bidirectional_attention(r_lat: Tensor, v_lat: Tensor | None, r_tok: Tensor, v_tok: Tensor, *,
                            scale: float | None = None, padding_mask: Tensor | None = None,
                            dropout_p: tuple[float, float] = (0.0, 0.0), backend: str = "auto",
                            packed_tok: Tensor | None = None,
                            shard: TokenShard | None = None) -> tuple[Tensor, Tensor | None]:
    """Both directions of BiXT's attention from one similarity matrix.

    r_lat, v_lat: (B, H, M, d); r_tok, v_tok: (B, H, N, d). `v_lat=None` is the one-sided form: only the
    latents are updated. `dropout_p` is (latent direction, token direction). `packed_tok`: the (B, N, 2 * H * d)
    projection that r_tok and v_tok are `split_heads` of, if they are; the fused backend then takes its gradient
    as one tensor (no stack and copy in autograd). Returns (latent update (B, H, M, d), token update (B, H, N, d)
    or None). `shard`: the tokens are this process's part of the samples' tokens (see the module docstring).
    """
    scale = r_lat.shape[-1] ** -0.5 if scale is None else scale
    drop_lat, drop_tok = dropout_p
    if shard is not None:
        return _sharded_bidirectional(r_lat, v_lat, r_tok, v_tok, scale, padding_mask, dropout_p, backend, packed_tok,
                                      shard)
    name = resolve_backend(backend, r_lat.device, r_lat.dtype)
    if backend == "auto" and not (drop_lat or drop_tok):
        training = torch.is_grad_enabled() and (r_lat.requires_grad or r_tok.requires_grad)
        name = auto_bidirectional(r_lat.device, r_lat.dtype, r_tok.shape[0], r_tok.shape[2], training) or name
    if name in ("fused", "triton"):
        if drop_lat or drop_tok:
            raise ValueError(f"the {name} attention backend has no attention dropout: use backend 'auto' or 'sdpa' "
                             "while training with attn_drop > 0")
        if name == "triton":
            from bixt.nn.triton_attention import triton_bidirectional_attention
            return triton_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, scale, padding_mask,
                                                  packed_tok=packed_tok)
        return fused_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, scale, padding_mask, packed_tok=packed_tok)
    if name == "math":
        scores = (r_lat @ r_tok.transpose(-2, -1)) * scale  # the one B x H x M x N matrix
        lat = _probs(scores, padding_mask, drop_lat) @ v_tok
        tok = None if v_lat is None else _probs(scores.transpose(-2, -1), None, drop_tok) @ v_lat
        return lat, tok
    # Two one-way calls with the roles swapped: equal to the above, A is just computed twice.
    lat = attention(r_lat, r_tok, v_tok, scale=scale, key_padding_mask=padding_mask, dropout_p=drop_lat,
                    backend=backend)
    tok = None if v_lat is None else attention(r_tok, r_lat, v_lat, scale=scale, dropout_p=drop_tok,
                                               backend=backend)
    return lat, tok


def _sharded_bidirectional(r_lat, v_lat, r_tok, v_tok, scale, padding_mask, dropout_p, backend, packed_tok,
                           shard):
    """`bidirectional_attention` over token shards: fused on a CPU in float32/64 without attention dropout (auto or
    named), else math: one local similarity block, the tokens' softmax local, the latents' merged over processes."""
    name = check_shard_backend(backend)
    cpu_fused = r_lat.device.type == "cpu" and r_lat.dtype in (torch.float32, torch.float64)
    if name == "fused" or (name == "auto" and cpu_fused and not any(dropout_p)):
        if any(dropout_p):
            raise ValueError("the fused attention backend has no attention dropout: use backend 'math' or 'auto' "
                             "while training with attn_drop > 0")
        return fused_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, scale, padding_mask, packed_tok=packed_tok,
                                             shard=shard)
    scores = (r_lat @ r_tok.transpose(-2, -1)) * scale
    lat = softmax_over_shards(scores, v_tok, shard, padding_mask, dropout_p[0])
    tok = None if v_lat is None else _probs(scores.transpose(-2, -1), None, dropout_p[1]) @ v_lat
    return lat, tok


def _merge_heads(x: Tensor) -> Tensor:
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


class _CrossAttention(nn.Module):
    """What both cross-attention forms share: dims, heads, scale, backend, dropouts (one rate, each direction
    dropping independently)."""

    def __init__(self, dim_lat: int, dim_tok: int | None, dim_attn: int | None, num_heads: int, attn_drop: float,
                 proj_drop: float, one_sided: bool, backend: str):
        super().__init__()
        self.dim_tok, self.dim_attn = dim_tok or dim_lat, dim_attn or dim_lat
        if self.dim_attn % num_heads:
            raise ValueError(f"attention dim {self.dim_attn} is not divisible by {num_heads} heads: "
                             "pick a head count that divides it")
        self.num_heads = num_heads
        self.scale = (self.dim_attn // num_heads) ** -0.5
        self.one_sided = one_sided
        self.backend = check_backend(backend)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.token_shard: TokenShard | None = None  # set by the model's shard_tokens


class BiDirectionalCrossAttention(_CrossAttention):
    """Bi-directional cross-attention between latents (B, M, dim_lat) and tokens (B, N, dim_tok).

    Six linear maps where two sequential cross-attentions need eight: R and V per side (fused into one Linear
    per side) and an output projection per side. `one_sided=True` keeps only the latents' update (BiXT's last
    layer): the latents project to R alone and the token side has no output projection.
    """

    def __init__(self, dim_lat: int, dim_tok: int | None = None, dim_attn: int | None = None, num_heads: int = 6,
                 bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, one_sided: bool = False,
                 backend: str = "auto"):
        super().__init__(dim_lat, dim_tok, dim_attn, num_heads, attn_drop, proj_drop, one_sided, backend)
        dim_tok, dim_attn = self.dim_tok, self.dim_attn
        if one_sided:
            self.r_lat = Linear(dim_lat, dim_attn, bias=bias)
        else:
            self.rv_lat = Linear(dim_lat, 2 * dim_attn, bias=bias)
            self.proj_tok = Linear(dim_attn, dim_tok)
        self.rv_tok = Linear(dim_tok, 2 * dim_attn, bias=bias)
        self.proj_lat = Linear(dim_attn, dim_lat)

    def forward(self, latents: Tensor, tokens: Tensor,
                padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        lat, tok = self.attend(latents, tokens, padding_mask)
        return self.project_latents(lat), None if tok is None else self.project_tokens(tok)

    def attend(self, latents: Tensor, tokens: Tensor,
               padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """`forward` up to the output projections: the heads' outputs merged, (B, M, dim_attn) for the latents and
        (B, N, dim_attn) or None for the tokens. A block projects them with `project_latents` / `project_tokens`,
        inside its residual sums (bixt.nn.layers.add_per_token)."""
        if self.one_sided:
            (r_lat,), v_lat = split_heads(self.r_lat(latents), 1, self.num_heads), None
        else:
            r_lat, v_lat = split_heads(self.rv_lat(latents), 2, self.num_heads)
        rv_tok = self.rv_tok(tokens)
        r_tok, v_tok = split_heads(rv_tok, 2, self.num_heads)
        p = self.attn_drop if self.training else 0.0
        # Under torch.compile the split halves reach the (eager) fused kernel as graph outputs of their own, no longer
        # views of rv_tok: it then takes their gradients apart.
        packed = None if torch.compiler.is_compiling() else rv_tok
        lat, tok = bidirectional_attention(r_lat, v_lat, r_tok, v_tok, scale=self.scale, padding_mask=padding_mask,
                                           dropout_p=(p, p), backend=self.backend, packed_tok=packed,
                                           shard=self.token_shard)
        return _merge_heads(lat), None if tok is None else _merge_heads(tok)

    def project_latents(self, lat: Tensor) -> Tensor:
        return self.proj_drop(self.proj_lat(lat))

    def project_tokens(self, tok: Tensor) -> Tensor:
        return self.proj_drop(self.proj_tok(tok))


class SequentialCrossAttention(_CrossAttention):
    """Two one-way cross-attentions, one after the other: the naive alternative BiXT is compared with.

    The latents read the tokens (`read_tokens`), then the tokens read the UPDATED latents (`read_latents`); what
    happens to the latents in between (BiXT's sequential layer: their residual and MLP) is the caller's. Each
    direction has its own q, k, v and output projections: 8 linear maps where bi-directional attention has 6 (k and
    v fused into one Linear per direction). `one_sided=True` keeps only the latents' direction.
    """

    def __init__(self, dim_lat: int, dim_tok: int | None = None, dim_attn: int | None = None, num_heads: int = 6,
                 bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, one_sided: bool = False,
                 backend: str = "auto"):
        super().__init__(dim_lat, dim_tok, dim_attn, num_heads, attn_drop, proj_drop, one_sided, backend)
        dim_tok, dim_attn = self.dim_tok, self.dim_attn
        self.q_lat = Linear(dim_lat, dim_attn, bias=bias)
        self.kv_tok = Linear(dim_tok, 2 * dim_attn, bias=bias)
        self.proj_lat = Linear(dim_attn, dim_lat)
        if not one_sided:
            self.q_tok = Linear(dim_tok, dim_attn, bias=bias)
            self.kv_lat = Linear(dim_lat, 2 * dim_attn, bias=bias)
            self.proj_tok = Linear(dim_attn, dim_tok)

    def _read(self, to_q: Linear, to_kv: Linear, to_out: Linear, x: Tensor, context: Tensor,
              key_padding_mask: Tensor | None, shard: TokenShard | None = None) -> Tensor:
        (q,) = split_heads(to_q(x), 1, self.num_heads)
        k, v = split_heads(to_kv(context), 2, self.num_heads)
        out = attention(q, k, v, scale=self.scale, key_padding_mask=key_padding_mask,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend, shard=shard)
        return self.proj_drop(to_out(_merge_heads(out)))

    def read_tokens(self, latents: Tensor, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The latents' update from the tokens (both normalised): (B, M, dim_lat)."""
        return self._read(self.q_lat, self.kv_tok, self.proj_lat, latents, tokens, padding_mask, self.token_shard)

    def read_latents(self, tokens: Tensor, latents: Tensor) -> Tensor:
        """The tokens' update from the (updated, normalised) latents: (B, N, dim_tok)."""
        if self.one_sided:
            raise ValueError("this cross-attention is one-sided: create it with one_sided=False to update tokens")
        return self._read(self.q_tok, self.kv_lat, self.proj_tok, tokens, latents, None)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (ViT-style); used on the latents."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads: pick a head count that divides it")
        self.num_heads = num_heads
        self.backend = check_backend(backend)
        self.attn_drop = attn_drop
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.project(self.attend(x, key_padding_mask))

    def attend(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """`forward` up to the output projection (`project`): the heads' outputs merged, (B, L, dim)."""
        q, k, v = split_heads(self.qkv(x), 3, self.num_heads)
        out = attention(q, k, v, key_padding_mask=key_padding_mask,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        return _merge_heads(out)

    def project(self, x: Tensor) -> Tensor:
        return self.proj_drop(self.proj(x))
