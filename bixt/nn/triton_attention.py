"""Bi-directional attention as Triton kernels: the fused backend's one-pass algorithm (bixt/nn/fused.py) on a GPU.

The tokens of each (sample, head) are cut into `splits` contiguous spans; one program per (span, sample x head)
walks its span in blocks of BLOCK_N tokens, with the M latents' R and V held in registers. Per block it computes
S = R_tok R_lat^T once (BLOCK_N x M) and takes both softmaxes from it:
- the tokens' softmax over the M latents is complete inside the block: the token update and its log-sum-exp are
  written out directly;
- the latents' softmax over the tokens is an online softmax over the span (running max, sum and weighted sum of
  V_tok), stored as one partial per span and merged by `_merge` (split-K, as flash-decoding does).

Why spans rather than one program per latent block: M = 64 latents give a flash kernel one query block per head,
a handful of programs on a 132-SM GPU; spans give B x H x splits, about four per SM.

Backward recomputes S per block from the saved base-2 log-sum-exps (per latent from the merge, per token from the
forward), writes the tokens' gradients directly and leaves partial sums of the latents' gradients per span, summed
afterwards (deterministic: no atomics).

Runs on CUDA; on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1 set before this module is first
imported), which is how the tests check it without a GPU. fp32 inputs use IEEE fp32 dot products unless
torch.backends.cuda.matmul.allow_tf32 is on; bf16/fp16 inputs keep every sum in fp32.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from bixt.nn.compile import eager_under_compile
from bixt.nn.layers import check_padding_mask, split_heads

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_SPAN_ALIGN = 16 if INTERPRETING else 128  # spans are whole blocks for every BLOCK_N used
# (tokens per block, warps) of the forward and backward kernels. Fixed rather than autotuned: autotuning would
# time candidates inside a model's first step (and its peak memory); benchmarks/bench_triton.py --sections configs
# measures the candidates. FORCE: a (BLOCK_N, num_warps) both kernels use instead (the benchmark sets it).
FORWARD_CONFIG, BACKWARD_CONFIG = (128, 4), (128, 8)
FORCE: tuple[int, int] | None = None
# The forward is memory-bound: a span per program short enough that ~16 programs per multiprocessor keep loads in
# flight (4 per SM reached 19 % of the copy bandwidth at 2^20 tokens on an H200); the latents' partials it costs
# are M x d floats per span.
PROGRAMS_PER_SM = 16


def _config(default: tuple[int, int]) -> dict:
    n, w = (16, 1) if INTERPRETING else (FORCE or default)
    return {"BLOCK_N": n, "num_warps": w}


@triton.jit
def _tile(PTR, b, h, s_b, s_h, s_row, rows, offs_d, ok):
    """Rows `rows` (features contiguous) of sample b, head h of a strided (B, H, L, d) tensor; 0 where not ok."""
    return tl.load(PTR + b * s_b + h * s_h + rows[:, None] * s_row + offs_d[None, :], mask=ok, other=0.0)


@triton.jit
def _put(PTR, b, h, s_b, s_h, s_row, rows, offs_d, ok, value):
    tl.store(PTR + b * s_b + h * s_h + rows[:, None] * s_row + offs_d[None, :], value.to(PTR.dtype.element_ty), mask=ok)


@triton.jit
def _forward_kernel(RL, VL, RT, VT, MASK, OT, LSE_T, PM, PL, PACC,
                    s_rl_b, s_rl_h, s_rl_m, s_vl_b, s_vl_h, s_vl_m,
                    s_rt_b, s_rt_h, s_rt_n, s_vt_b, s_vt_h, s_vt_n, s_mask_b, s_ot_b, s_ot_h, s_ot_n,
                    H, M, N, D, span, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TWO_SIDED: tl.constexpr, HAS_MASK: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    split, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    m_ok, d_ok = offs_m < M, offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    rl = _tile(RL, b, h, s_rl_b, s_rl_h, s_rl_m, offs_m, offs_d, md_ok)
    if TWO_SIDED:
        vl = _tile(VL, b, h, s_vl_b, s_vl_h, s_vl_m, offs_m, offs_d, md_ok)
    # A finite "minus infinity" for the running maxima: an all-padding span merges as weight 0, not NaN.
    m_run = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_start = split * span
    for i in range(0, span // BLOCK_N):  # the last span may run past N: those rows are masked
        offs_n = n_start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        nd_ok = n_ok[:, None] & d_ok[None, :]
        rt = _tile(RT, b, h, s_rt_b, s_rt_h, s_rt_n, offs_n, offs_d, nd_ok)
        vt = _tile(VT, b, h, s_vt_b, s_vt_h, s_vt_n, offs_n, offs_d, nd_ok)
        s = tl.dot(rt, tl.trans(rl), input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M), base-2 logits
        if TWO_SIDED:  # each token's softmax over the latents: complete in this block
            s_tok = tl.where(m_ok[None, :], s, float("-inf"))
            m_tok = tl.max(s_tok, axis=1)
            p_tok = tl.exp2(s_tok - m_tok[:, None])
            l_tok = tl.sum(p_tok, axis=1)
            out = tl.dot(p_tok.to(vl.dtype), vl, input_precision=PREC) / l_tok[:, None]
            _put(OT, b, h, s_ot_b, s_ot_h, s_ot_n, offs_n, offs_d, nd_ok, out)
            tl.store(LSE_T + bh * N + offs_n, m_tok + tl.log2(l_tok), mask=n_ok)
        keep = n_ok
        if HAS_MASK:
            keep = keep & (tl.load(MASK + b * s_mask_b + offs_n, mask=n_ok, other=1) == 0)
        s_lat = tl.where(keep[:, None], s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s_lat, axis=0))
        alpha = tl.exp2(m_run - m_new)
        p_lat = tl.exp2(s_lat - m_new[None, :])
        l_run = l_run * alpha + tl.sum(p_lat, axis=0)
        acc = acc * alpha[:, None] + tl.dot(tl.trans(p_lat).to(vt.dtype), vt, input_precision=PREC)
        m_run = m_new
    part = bh * tl.num_programs(0) + split
    tl.store(PM + part * BLOCK_M + offs_m, m_run)
    tl.store(PL + part * BLOCK_M + offs_m, l_run)
    tl.store(PACC + part * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _backward_kernel(RL, VL, RT, VT, MASK, OT, DOT, LSE_T, DOL, LSE_L, DELTA_L, DRT, DVT, PDRL, PDVL,
                     s_rl_b, s_rl_h, s_rl_m, s_vl_b, s_vl_h, s_vl_m,
                     s_rt_b, s_rt_h, s_rt_n, s_vt_b, s_vt_h, s_vt_n, s_mask_b, s_ot_b, s_ot_h, s_ot_n,
                     s_dot_b, s_dot_h, s_dot_n, s_drt_b, s_drt_h, s_drt_n, s_dvt_b, s_dvt_h, s_dvt_n,
                     H, M, N, D, span, qk_scale, scale,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TWO_SIDED: tl.constexpr, HAS_MASK: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    split, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    m_ok, d_ok = offs_m < M, offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    rl = _tile(RL, b, h, s_rl_b, s_rl_h, s_rl_m, offs_m, offs_d, md_ok)
    # The latents' output gradient, log-sum-exps and D = rowsum(dO * O) are (BH, BLOCK_M[, BLOCK_D]) float32.
    dol = tl.load(DOL + bh * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :]).to(rl.dtype)
    lse_l = tl.load(LSE_L + bh * BLOCK_M + offs_m)
    delta_l = tl.load(DELTA_L + bh * BLOCK_M + offs_m)
    if TWO_SIDED:
        vl = _tile(VL, b, h, s_vl_b, s_vl_h, s_vl_m, offs_m, offs_d, md_ok)
        acc_dvl = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_drl = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_start = split * span
    for i in range(0, span // BLOCK_N):  # the last span may run past N: those rows are masked
        offs_n = n_start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        nd_ok = n_ok[:, None] & d_ok[None, :]
        rt = _tile(RT, b, h, s_rt_b, s_rt_h, s_rt_n, offs_n, offs_d, nd_ok)
        vt = _tile(VT, b, h, s_vt_b, s_vt_h, s_vt_n, offs_n, offs_d, nd_ok)
        s = tl.dot(rt, tl.trans(rl), input_precision=PREC) * qk_scale
        keep = n_ok
        if HAS_MASK:
            keep = keep & (tl.load(MASK + b * s_mask_b + offs_n, mask=n_ok, other=1) == 0)
        p_lat = tl.exp2(tl.where(keep[:, None], s, float("-inf")) - lse_l[None, :])  # (BLOCK_N, BLOCK_M)
        dvt = tl.dot(p_lat.to(dol.dtype), dol, input_precision=PREC)
        dp_lat = tl.dot(vt, tl.trans(dol), input_precision=PREC)
        ds = p_lat * (dp_lat - delta_l[None, :])
        if TWO_SIDED:
            d_out = _tile(DOT, b, h, s_dot_b, s_dot_h, s_dot_n, offs_n, offs_d, nd_ok)
            out = _tile(OT, b, h, s_ot_b, s_ot_h, s_ot_n, offs_n, offs_d, nd_ok)
            delta_t = tl.sum(d_out.to(tl.float32) * out.to(tl.float32), axis=1)
            lse_t = tl.load(LSE_T + bh * N + offs_n, mask=n_ok, other=0.0)
            p_tok = tl.exp2(tl.where(m_ok[None, :], s, float("-inf")) - lse_t[:, None])
            dp_tok = tl.dot(d_out.to(vl.dtype), tl.trans(vl), input_precision=PREC)
            ds += p_tok * (dp_tok - delta_t[:, None])
            acc_dvl += tl.dot(tl.trans(p_tok).to(vl.dtype), d_out.to(vl.dtype), input_precision=PREC)
        ds = ds.to(rl.dtype)
        drt = tl.dot(ds, rl, input_precision=PREC) * scale
        acc_drl += tl.dot(tl.trans(ds), rt, input_precision=PREC)
        _put(DRT, b, h, s_drt_b, s_drt_h, s_drt_n, offs_n, offs_d, nd_ok, drt)
        _put(DVT, b, h, s_dvt_b, s_dvt_h, s_dvt_n, offs_n, offs_d, nd_ok, dvt)
    part = (bh * tl.num_programs(0) + split) * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(PDRL + part, acc_drl * scale)
    if TWO_SIDED:
        tl.store(PDVL + part, acc_dvl)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every dimension >= 16


@functools.cache
def _programs(device_index: int | None) -> int:
    """Programs a launch should have: enough resident per multiprocessor to keep its loads in flight."""
    sms = 4 if device_index is None else torch.cuda.get_device_properties(device_index).multi_processor_count
    return PROGRAMS_PER_SM * sms


def _splits(BH: int, N: int, device: torch.device) -> tuple[int, int]:
    """(spans per sample and head, tokens per span): about PROGRAMS_PER_SM programs per multiprocessor."""
    target = _programs(torch.cuda.current_device() if device.index is None else device.index) \
        if device.type == "cuda" else _programs(None)
    span = -(-N // max(1, min(-(-target // BH), -(-N // _SPAN_ALIGN))))
    span = -(-span // _SPAN_ALIGN) * _SPAN_ALIGN
    return -(-N // span), span


def _precision(dtype: torch.dtype) -> str:
    # Only float32 operands have a choice; half-precision ones take Triton's default.
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _bhn(x: Tensor) -> tuple[int, int, int]:
    if x.stride(3) != 1:
        raise ValueError("triton attention wants head features contiguous (stride 1 along d)")
    return x.stride(0), x.stride(1), x.stride(2)


def _token_major(x: Tensor, B: int, H: int, N: int, d: int) -> Tensor:
    # (B, H, N, d) with the memory of (B, N, H, d): the module's head merge is then a free view.
    return x.new_empty(B, N, H, d).permute(0, 2, 1, 3)


def _merge(pm: Tensor, pl: Tensor, pacc: Tensor) -> tuple[Tensor, Tensor]:
    """Per-span (max, sum, weighted sum) -> (latent update, base-2 log-sum-exp), both float32."""
    m = pm.amax(dim=1, keepdim=True)
    w = torch.exp2(pm - m)
    l_ = (pl * w).sum(dim=1)
    out = (pacc * w[..., None]).sum(dim=1) / l_[..., None]
    return out, m.squeeze(1) + torch.log2(l_)


class TritonBiDirectionalAttention(torch.autograd.Function):
    """(r_lat, v_lat | None, r_tok, v_tok, packed_tok, padding_mask | None, scale) -> (latent update, token
    update | None), as `bixt.nn.fused.FusedBiDirectionalAttention`; r_tok and v_tok may be views of packed_tok."""

    @staticmethod
    def forward(ctx, r_lat, v_lat, r_tok, v_tok, packed_tok, padding_mask, scale):
        B, H, M, d = (int(x) for x in r_lat.shape)  # plain ints also under jit tracing (fvcore's count)
        if packed_tok is not None:
            r_tok, v_tok = split_heads(packed_tok, 2, H)
        N = int(r_tok.shape[2])
        BM, BD, two = _pow2(M), _pow2(d), v_lat is not None
        splits, span = _splits(B * H, N, r_lat.device)
        f32 = dict(device=r_lat.device, dtype=torch.float32)
        pm, pl = torch.empty(B * H, splits, BM, **f32), torch.empty(B * H, splits, BM, **f32)
        pacc = torch.empty(B * H, splits, BM, BD, **f32)
        tok = _token_major(r_tok, B, H, N, d) if two else None
        lse_tok = torch.empty(B * H, N, **f32) if two else pm
        mask = None if padding_mask is None else padding_mask.view(torch.uint8)
        vl = v_lat if two else r_lat
        ot = tok if two else r_tok
        _forward_kernel[(splits, B * H)](
            r_lat, vl, r_tok, v_tok, r_tok if mask is None else mask, ot, lse_tok, pm, pl, pacc,
            *_bhn(r_lat), *_bhn(vl), *_bhn(r_tok), *_bhn(v_tok), 0 if mask is None else mask.stride(0),
            *_bhn(ot), H, M, N, d, span, scale * _LOG2E,
            BLOCK_M=BM, BLOCK_D=BD, TWO_SIDED=two, HAS_MASK=mask is not None, PREC=_precision(r_lat.dtype),
            **_config(FORWARD_CONFIG))
        lat32, lse_lat = _merge(pm, pl, pacc)
        ctx.scale, ctx.packed, ctx.split = scale, packed_tok is not None, (splits, span)
        ctx.save_for_backward(r_lat, v_lat, *((packed_tok, None) if ctx.packed else (r_tok, v_tok)), padding_mask,
                              lat32, lse_lat, tok, lse_tok if two else None)
        lat = lat32[:, :M, :d].reshape(B, H, M, d).to(r_lat.dtype)
        return lat, tok

    @staticmethod
    def backward(ctx, d_lat, d_tok):
        r_lat, v_lat, r_tok, v_tok, padding_mask, lat32, lse_lat, tok, lse_tok = ctx.saved_tensors
        B, H, M, d = (int(x) for x in r_lat.shape)
        if ctx.packed:
            packed, (r_tok, v_tok) = r_tok, split_heads(r_tok, 2, H)
        N, two = int(r_tok.shape[2]), v_lat is not None
        BM, BD = _pow2(M), _pow2(d)
        splits, span = ctx.split
        dol = torch.zeros(B * H, BM, BD, device=r_lat.device, dtype=torch.float32)
        dol[:, :M, :d] = d_lat.reshape(B * H, M, d)
        delta_l = (dol * lat32).sum(dim=2)
        if ctx.packed:  # the gradient of the packed projection, written in place through its two halves
            d_packed = torch.empty_like(packed, memory_format=torch.contiguous_format)
            d_rt, d_vt = split_heads(d_packed, 2, H)
        else:
            d_rt, d_vt = _token_major(r_tok, B, H, N, d), _token_major(r_tok, B, H, N, d)
        f32 = dict(device=r_lat.device, dtype=torch.float32)
        pdrl = torch.empty(B * H, splits, BM, BD, **f32)
        pdvl = torch.empty(B * H, splits, BM, BD, **f32) if two else pdrl
        mask = None if padding_mask is None else padding_mask.view(torch.uint8)
        vl = v_lat if two else r_lat
        ot = tok if two else r_tok
        if two and d_tok.stride(3) != 1:
            d_tok = d_tok.contiguous()
        dot = d_tok if two else r_tok
        _backward_kernel[(splits, B * H)](
            r_lat, vl, r_tok, v_tok, r_tok if mask is None else mask, ot, dot, lse_tok if two else lse_lat, dol,
            lse_lat, delta_l, d_rt, d_vt, pdrl, pdvl,
            *_bhn(r_lat), *_bhn(vl), *_bhn(r_tok), *_bhn(v_tok), 0 if mask is None else mask.stride(0),
            *_bhn(ot), *_bhn(dot), *_bhn(d_rt), *_bhn(d_vt), H, M, N, d, span, ctx.scale * _LOG2E, ctx.scale,
            BLOCK_M=BM, BLOCK_D=BD, TWO_SIDED=two, HAS_MASK=mask is not None, PREC=_precision(r_lat.dtype),
            **_config(BACKWARD_CONFIG))
        g_rlat = pdrl.sum(dim=1)[:, :M, :d].reshape(B, H, M, d).to(r_lat.dtype)
        g_vlat = pdvl.sum(dim=1)[:, :M, :d].reshape(B, H, M, d).to(r_lat.dtype) if two else None
        g_tok = (None, None, d_packed) if ctx.packed else (d_rt, d_vt, None)
        return g_rlat, g_vlat, *g_tok, None, None


@eager_under_compile  # Triton kernels already: torch.compile leaves them out of the graph
def triton_bidirectional_attention(r_lat: Tensor, v_lat: Tensor | None, r_tok: Tensor, v_tok: Tensor, scale: float,
                                   padding_mask: Tensor | None = None,
                                   packed_tok: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Both directions of BiXT's attention, forward and backward in Triton; arguments as
    `bixt.nn.fused.fused_bidirectional_attention`. CUDA tensors (CPU ones under TRITON_INTERPRET=1), float32,
    bfloat16 or float16, all of one dtype."""
    B, H, M, d = r_lat.shape
    check_padding_mask(padding_mask, (B, r_tok.shape[2]))
    if r_lat.device.type != "cuda" and not INTERPRETING:
        raise ValueError(f"the triton attention backend runs on CUDA (tensors are on {r_lat.device.type}): use "
                         "backend 'auto', or set TRITON_INTERPRET=1 before importing bixt to run it interpreted")
    tensors = [t for t in (r_lat, v_lat, r_tok, v_tok) if t is not None]
    if len({t.dtype for t in tensors}) > 1 or r_lat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton attention takes float32, bfloat16 or float16 inputs of one dtype, got "
                         f"{sorted({str(t.dtype) for t in tensors})}")
    if packed_tok is not None and split_heads(packed_tok, 2, H)[0].data_ptr() != r_tok.data_ptr():
        raise ValueError("packed_tok must be the tensor r_tok and v_tok were split from by "
                         "bixt.nn.layers.split_heads(packed_tok, 2, heads); pass packed_tok=None otherwise")
    r_lat = r_lat if r_lat.stride(3) == 1 else r_lat.contiguous()
    v_lat = v_lat if v_lat is None or v_lat.stride(3) == 1 else v_lat.contiguous()
    if packed_tok is not None:
        r_tok = v_tok = None
    else:
        r_tok, v_tok = (t if t.stride(3) == 1 else t.contiguous() for t in (r_tok, v_tok))
    return TritonBiDirectionalAttention.apply(r_lat, v_lat, r_tok, v_tok, packed_tok, padding_mask, scale)
