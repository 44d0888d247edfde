"""Fused bi-directional attention: one similarity computation per token chunk, no M x N tensor kept.

The tokens are processed in chunks of C. For one chunk the block S = R_tok R_lat^T * scale is C x M (token-major):
- the tokens' softmax over the M latents is complete inside the block (along memory), so the tokens' output is
  one matmul with the exponentiated block, written straight into the output and divided by the block's row sums;
- the latents' softmax over all N tokens is an online softmax (FlashAttention-style running sums).

One exponential per block serves both directions. The block is exponentiated once with the tokens' offsets,
E_ji = exp(S_ji - max_i S_ji); the latents need exp(S_ji - m) with one offset m per head: that is E_ji * f_j with
f_j = exp(max_i S_ji - m) <= 1, a factor per TOKEN, folded into the token values (E^T @ (f * V_tok)) instead of a
second pass over the block; padding sets f_j = 0. It loses precision only for a latent whose similarities all sit
~40 below its head's maximum; that is detected (its softmax denominator is tiny) and the latents are then
recomputed with per-latent offsets (`_latents_per_row`, also the one-sided path).

On CPU the tokens are split into contiguous ranges, one per thread; each range's latent sums are partial
(split-K, as in flash-decoding) and `_merge` combines them, rescaling to the largest offset.

Backward recomputes each block from R and the saved log-sum-exps (per latent, and per token: N floats per head,
which spares a max pass per block) and gets both directions' dS from ONE extra matmul: P_lat = P_tok * g_i * h_j
is a rank-1 rescaling, so g and h go into the small operands (see `_backward_pass`).

CPU details that matter (measured): exp2 is ~2x faster than exp, so log2(e) is folded into the pre-scaled R_lat
and log-sum-exps are kept in base 2; token-major blocks keep every matmul on MKL's fast layouts; outputs and
token gradients are laid out (B, N, H, d), so the module's head merge is a view.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor

from bixt.nn.compile import eager_under_compile
from bixt.nn.layers import check_padding_mask, split_heads
from bixt.nn.sharding import TokenShard, all_reduce_, merge_online_softmax

# A latent whose softmax denominator (relative to its head's offset) falls below this has lost precision to
# underflow in the shared-exp forward: recompute the latents with per-latent offsets.
_TINY = 2.0**-60
_DEFAULT_CACHE = 16 * 1024**2
_AUTO_MIN_TOKENS = {True: 4096, False: 8192}  # tokens in the batch, by whether a backward pass follows
_LOG2E = 1.4426950408889634


@functools.cache
def cache_bytes() -> int:
    """Size of the CPU's last-level cache (Linux sysfs); 16 MiB when unknown."""
    root, best = "/sys/devices/system/cpu/cpu0/cache", 0
    try:
        for index in (i for i in os.listdir(root) if i.startswith("index")):
            with open(f"{root}/{index}/type") as tf, open(f"{root}/{index}/size") as sf:
                if tf.read().strip() in ("Unified", "Data"):
                    size = sf.read().strip()
                    best = max(best, int(size[:-1]) * {"K": 1024, "M": 1024**2}[size[-1]])
    except (OSError, ValueError, KeyError):
        pass
    return best or _DEFAULT_CACHE


def chunk_size(batch: int, heads: int, latents: int, head_dim: int, cache: int | None = None,
               threads: int | None = None) -> int:
    """Tokens per chunk: the chunks that `threads` threads (default: torch's count) work on at once fill half of
    the last-level cache.

    Per token and head a chunk holds two M-long float32 columns (the block and the backward's dS) and about six
    d-long rows (R, V, output, gradients). Measured on a 2-core Zen 3 (1 MiB L2 per core, 32 MiB L3), M=64, H=6,
    d=32, 2 threads, forward + backward at N=65,536: 512 tokens 236 ms, 1,024 218 ms, 2,176 231 ms; smaller chunks
    pay the fixed cost of ~15 torch ops per chunk, larger ones spill the cache.
    """
    per_token = batch * heads * (2 * latents + 6 * head_dim) * 4
    c = (cache or cache_bytes()) // 2 // per_token // max(1, threads or torch.get_num_threads())
    return int(min(max(256, c // 64 * 64), 16384))


def fused_macs(batch: int, heads: int, latents: int, tokens: int, head_dim: int, two_sided: bool = True) -> int:
    """Multiply-accumulates of one forward call: the similarity once plus one value product per direction."""
    return batch * heads * latents * tokens * head_dim * (3 if two_sided else 2)


def fused_wins(device: torch.device, dtype: torch.dtype, tokens: int, training: bool) -> bool:
    """Where `auto` picks this backend over sdpa on a machine `bixt tune` has not measured (`bixt.nn.autotune`):
    CPU, float32/64, and at least 4,096 tokens in the batch (`tokens` = B x N) when a backward pass follows
    (`training`), 8,192 when not. Measured on a 2-core AMD EPYC by `python benchmarks/bench_attention.py
    --crossover` (benchmarks/results/crossover.json); other processors differ, hence `bixt tune`.
    """
    return device.type == "cpu" and dtype in (torch.float32, torch.float64) and tokens >= _AUTO_MIN_TOKENS[training]


def _rows(x: Tensor, n0: int, n1: int, buf: Tensor | None = None) -> Tensor | None:
    """x[:, :, n0:n1] of a (B, H, N, d) tensor as (B*H, n, d): a view when the layout allows, else a copy in
    `buf` (None without one)."""
    part = x[:, :, n0:n1]
    B, H, n, d = part.shape
    if B == 1 or part.stride(0) == H * part.stride(1):
        return part.reshape(B * H, n, d)
    if buf is None:
        return None
    out = buf.view(-1)[: part.numel()].view(B, H, n, d)
    out.copy_(part)
    return out.view(B * H, n, d)


def _store(x: Tensor, n0: int, n1: int, fn, buf: Tensor, add: bool = False) -> Tensor:
    """Rows n0:n1 of x (B, H, N, d) set to (or, with add, increased by) fn(out=...), a (B*H, n, d) product.

    The product is written straight into x when its layout allows, else into `buf` and copied. Returns the rows.
    """
    rows = x[:, :, n0:n1]
    view = _rows(x, n0, n1)
    if view is not None and not add:
        fn(out=view)
        return rows
    val = fn(out=buf.view(-1)[: rows.numel()].view(-1, n1 - n0, rows.shape[3])).view(rows.shape)
    return rows.add_(val) if add else rows.copy_(val)


def _block(buf: Tensor, n: int) -> Tensor:
    """A contiguous (BH, n, M) block in the storage of a (BH, C, M) buffer (bmm wants a contiguous out=)."""
    BH, _, M = buf.shape
    return buf.view(-1)[: BH * n * M].view(BH, n, M)


def _token_major(B: int, H: int, N: int, d: int, like: Tensor) -> Tensor:
    # (B, H, N, d) with the memory of (B, N, H, d): merging heads afterwards is then a free view.
    return like.new_empty(B, N, H, d).permute(0, 2, 1, 3)


def _blocks(n_a: int, n_b: int, C: int):
    """Tokens n_a:n_b in blocks of at most C, evened out (no tiny last block)."""
    count = -(-(n_b - n_a) // C)
    size = -(-(n_b - n_a) // count) if count else C
    return [(n0, min(n0 + size, n_b)) for n0 in range(n_a, n_b, size)]


def _latents_per_row(rl2t: Tensor, r_tok: Tensor, v_tok: Tensor, mask: Tensor | None, C: int, n_a: int, n_b: int):
    """The latents' direction alone over tokens n_a:n_b, with a running max per latent: the one-sided forward and
    the fallback. rl2t: (BH, d, M), R_lat pre-scaled by scale * log2(e). Returns partial sums for `_merge`:
    (BH, d + 1, M) (last row the softmax denominators) and the offsets (BH, 1, M)."""
    BH, d, M = rl2t.shape
    B, H = r_tok.shape[:2]
    S = rl2t.new_empty(BH, C, M)
    buf = rl2t.new_empty(2, BH * C * d)
    acc = rl2t.new_zeros(BH, d + 1, M)
    m = rl2t.new_full((BH, 1, M), torch.finfo(rl2t.dtype).min)
    for n0, n1 in _blocks(n_a, n_b, C):
        e = torch.bmm(_rows(r_tok, n0, n1, buf[0]), rl2t, out=_block(S, n1 - n0))
        if mask is not None:
            e.view(B, H, n1 - n0, M).masked_fill_(mask[:, None, n0:n1, None], float("-inf"))
        m_new = torch.maximum(m, e.amax(dim=1, keepdim=True))
        alpha = (m - m_new).exp2_()
        m = m_new
        e.sub_(m).exp2_()
        acc.mul_(alpha)
        acc[:, :d].baddbmm_(_rows(v_tok, n0, n1, buf[1]).transpose(1, 2), e)
        acc[:, d:].add_(e.sum(dim=1, keepdim=True))
    return acc, m


def _forward_range(rl2t, vl, r_tok, v_tok, mask, C, n_a, n_b, tok, lse_tok):
    """Both directions over tokens n_a:n_b: writes their token update into `tok` and their base-2 log-sum-exps into
    `lse_tok` (BH, N); returns the latents' partial sums for `_merge`: (BH, d + 1, M) (last row the softmax
    denominators) relative to one offset per head, (BH, 1, 1)."""
    BH, d, M = rl2t.shape
    B, H = r_tok.shape[:2]
    S = rl2t.new_empty(BH, C, M)
    buf = rl2t.new_empty(3, BH * C * (d + 1))
    acc = rl2t.new_zeros(BH, d + 1, M)
    m = rl2t.new_full((BH, 1), torch.finfo(rl2t.dtype).min)
    for n0, n1 in _blocks(n_a, n_b, C):
        n = n1 - n0
        e = torch.bmm(_rows(r_tok, n0, n1, buf[0]), rl2t, out=_block(S, n))
        cmax = e.amax(dim=2, keepdim=True)
        e.sub_(cmax).exp2_()
        colsum = e.sum(dim=2, keepdim=True)
        # The tokens' softmax over latents is complete in this block; normalising the (n, d) product instead of
        # the (n, M) block saves a pass over the block.
        rows = _store(tok, n0, n1, lambda out, e=e: torch.bmm(e, vl, out=out), buf[2])
        rows.div_(colsum.view(B, H, n, 1))
        torch.add(cmax, colsum.log2_(), out=lse_tok[:, n0:n1, None])
        c = cmax.view(BH, n)
        if mask is not None:
            c = c.view(B, H, n).masked_fill(mask[:, None, n0:n1], float("-inf")).view(BH, n)
        # The latents' weights exp2(S - m) = e * f_j with f_j = exp2(cmax_j - m) <= 1: a factor per token.
        m_new = torch.maximum(m, c.amax(dim=1, keepdim=True))
        alpha = (m - m_new).exp2_()[:, :, None]
        m = m_new
        vf = buf[1, : BH * n * (d + 1)].view(BH, n, d + 1)
        f = torch.sub(c, m, out=vf[:, :, d]).exp2_()
        torch.mul(v_tok[:, :, n0:n1], f.view(B, H, n, 1), out=vf[:, :, :d].view(B, H, n, d))
        acc.mul_(alpha).baddbmm_(vf.transpose(1, 2), e)
    return acc, m[:, :, None]


def _merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Partial online-softmax sums of disjoint token ranges [(sums, offsets)] -> one (sums, offsets) (split-K)."""
    m = functools.reduce(torch.maximum, [p[1] for p in parts])
    return sum(acc * (mk - m).exp2() for acc, mk in parts), m


_POOL: ThreadPoolExecutor | None = None
_MIN_TOKENS_PER_THREAD = 256


def _token_ranges(N: int, device: torch.device) -> list[tuple[int, int]]:
    """Contiguous token ranges, one per intra-op thread on CPU (at least _MIN_TOKENS_PER_THREAD each).

    Splitting the tokens rather than the heads gives each thread its own rows of every output: threads splitting
    heads write interleaved parts of the same freshly allocated pages, and the page faults then contend (measured:
    each thread 1.5x slower than alone).
    """
    T = torch.get_num_threads() if device.type == "cpu" else 1
    parts = max(1, min(T, N // _MIN_TOKENS_PER_THREAD))
    cuts = [N * k // parts for k in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=False))


def _run(fn, items: list) -> list:
    """fn over items: inline for one item, else one item per pool thread with single-threaded torch ops.

    The items are independent, so threads never wait on each other until the end, whereas torch's own intra-op
    threads meet at a barrier after every op (~15 per block): on a busy machine each barrier can cost a scheduler
    time slice (measured: 2-10x slowdowns). torch's thread count is set to 1 for the duration (a process-wide
    setting; restored after) so the items do not oversubscribe the cores.
    """
    global _POOL
    if len(items) == 1:
        return [fn(items[0])]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="bixt-fused")
    inference = torch.is_inference_mode_enabled()

    def call(item):
        with torch.inference_mode(inference), torch.no_grad():  # grad/inference modes are per thread
            return fn(item)

    with _SINGLE_THREADED:
        return list(_POOL.map(call, items))


class _SingleThreaded:
    """torch.set_num_threads(1) while any caller is inside; the last one out restores the count (thread-safe)."""

    def __init__(self):
        self.lock, self.inside, self.saved = threading.Lock(), 0, 1

    def __enter__(self):
        with self.lock:
            if self.inside == 0:
                self.saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self.inside += 1

    def __exit__(self, *exc):
        with self.lock:
            self.inside -= 1
            if self.inside == 0:
                torch.set_num_threads(self.saved)


_SINGLE_THREADED = _SingleThreaded()


class LatentGrad(NamedTuple):
    """The latents' direction in a backward pass (shapes per B*H row; N the tokens, M the latents).

    Either `row_off` is given (E is recomputed with the latents' own log-sum-exps: E = P_lat) or `g` is (the pass
    also holds the tokens' direction, E = P_tok, and P_lat = E * g_i * h_j)."""

    d_lat: Tensor  # (BH, M, d): the gradient of the latents' output
    D_lat: Tensor  # (BH, M, 1): rowsum(d_lat * output), softmax's backward term
    h: Tensor | None  # (BH, N): a factor per token (0 on padding); None: all 1
    g: Tensor | None = None  # (BH, M, 1): a factor per latent, with the tokens' direction in the same pass
    row_off: Tensor | None = None  # (BH, M): the latents' base-2 log-sum-exps, without the tokens' direction


class TokenGrad(NamedTuple):
    """The tokens' direction in a backward pass: E = P_tok, recomputed with the tokens' log-sum-exps."""

    v_lat: Tensor  # (BH, M, d)
    d_tok: Tensor  # (B, H, N, d): the gradient of the tokens' output
    tok: Tensor  # (B, H, N, d): the tokens' output
    col_off: Tensor  # (BH, N): the tokens' base-2 log-sum-exps


class BackwardPass(NamedTuple):
    """One sweep over the tokens: either direction or both; `accumulate` adds to the token gradients an earlier
    pass wrote instead of overwriting them."""

    lat: LatentGrad | None = None
    tok: TokenGrad | None = None
    accumulate: bool = False


class FusedBiDirectionalAttention(torch.autograd.Function):
    """(r_lat, v_lat | None, r_tok, v_tok, packed_tok, padding_mask | None, scale, chunk, shard | None) -> (latent
    update, token update | None); either r_tok and v_tok or packed_tok (see `fused_bidirectional_attention`) is None.

    Shapes as `bixt.nn.attention.bidirectional_attention`; the token update is a (B, H, N, d) view of (B, N, H, d)
    memory. Token ranges run in parallel threads (`_run`); the latents' partial sums are merged at the end, and
    with a `shard` (bixt.nn.sharding.TokenShard) over the processes that hold the other tokens: the latents' output
    and log-sum-exps are then global, and backward sums the shares of their gradient first; the rest is local.
    """

    @staticmethod
    def forward(ctx, r_lat, v_lat, r_tok, v_tok, packed_tok, padding_mask, scale, chunk, shard):
        B, H, M, d = r_lat.shape
        if packed_tok is not None:
            r_tok, v_tok = split_heads(packed_tok, 2, H)
        N, BH = r_tok.shape[2], B * H
        C = min(chunk, N)
        ranges = _token_ranges(N, r_lat.device)
        rl2t = (r_lat * (scale * _LOG2E)).reshape(BH, M, d).transpose(1, 2)
        tok = lse_tok = m = None
        shared = False
        if v_lat is not None:
            tok, lse_tok = _token_major(B, H, N, d, r_lat), r_lat.new_empty(BH, N)
            vl = v_lat.reshape(BH, M, d).contiguous()
            acc, m = _merge(_run(lambda r: _forward_range(rl2t, vl, r_tok, v_tok, padding_mask, C, *r, tok, lse_tok),
                                 ranges))
            if shard is not None:
                acc, m = merge_online_softmax(acc, m, shard)
            shared = bool(acc[:, d].min() >= _TINY)
            m_lat = m
        if not shared:  # one-sided, or some latent's similarities all sit far below its head's maximum
            acc, m_lat = _merge(_run(lambda r: _latents_per_row(rl2t, r_tok, v_tok, padding_mask, C, *r), ranges))
            if shard is not None:
                acc, m_lat = merge_online_softmax(acc, m_lat, shard)
        l_ = acc[:, d:]
        lat = (acc[:, :d] / l_).transpose(1, 2).reshape(B, H, M, d)
        lse_lat = (m_lat + l_.log2()).view(B, H, M)
        ctx.shared, ctx.ranges, ctx.scale, ctx.chunk = shared, ranges, scale, C
        ctx.packed, ctx.shard = packed_tok is not None, shard
        ctx.save_for_backward(r_lat, v_lat, *((packed_tok, None) if ctx.packed else (r_tok, v_tok)), padding_mask,
                              lat, tok, lse_lat, lse_tok, m)
        return lat, tok

    @staticmethod
    def backward(ctx, d_lat, d_tok):
        r_lat, v_lat, r_tok, v_tok, mask, lat, tok, lse_lat, lse_tok, m = ctx.saved_tensors
        if ctx.shard is not None:  # every process's tokens fed the latents' output: their gradient shares add up
            d_lat = all_reduce_(d_lat.clone(memory_format=torch.contiguous_format), ctx.shard)
        B, H, M, d = r_lat.shape
        if ctx.packed:
            packed, (r_tok, v_tok) = r_tok, split_heads(r_tok, 2, H)
        N, BH = r_tok.shape[2], B * H
        rl, d_lat = r_lat.reshape(BH, M, d).contiguous(), d_lat.reshape(BH, M, d)
        lse_lat = lse_lat.reshape(BH, M)
        keep = None if mask is None else (~mask)[:, None].expand(B, H, N).reshape(BH, N).to(rl.dtype)
        lat_pass = LatentGrad(d_lat, (d_lat * lat.reshape(BH, M, d)).sum(dim=2, keepdim=True), h=keep)
        if v_lat is None:
            passes = [BackwardPass(lat=lat_pass._replace(row_off=lse_lat))]
        else:
            tok_pass = TokenGrad(v_lat.reshape(BH, M, d), d_tok, tok, col_off=lse_tok)
            if ctx.shared:  # one pass: P_lat = P_tok * g_i * h_j
                g = (m.view(BH, 1) - lse_lat).exp2_()[:, :, None]
                h = (lse_tok - m.view(BH, 1)).exp2_()
                passes = [BackwardPass(lat=lat_pass._replace(g=g, h=h if keep is None else h.mul_(keep)),
                                       tok=tok_pass)]
            else:
                passes = [BackwardPass(lat=lat_pass._replace(row_off=lse_lat)),
                          BackwardPass(tok=tok_pass, accumulate=True)]
        if ctx.packed:  # the gradient of the packed projection, written in place through its two halves
            d_packed = torch.empty_like(packed, memory_format=torch.contiguous_format)
            tok_grads = dict(zip(("r_tok", "v_tok"), split_heads(d_packed, 2, H), strict=True))
        else:
            tok_grads = dict(r_tok=_token_major(B, H, N, d, r_lat), v_tok=_token_major(B, H, N, d, r_lat))

        def work(rng):
            grads = dict(r_lat=rl.new_zeros(BH, d, M), v_lat=rl.new_zeros(BH, d, M), **tok_grads)
            for p in passes:
                _backward_pass(rl, r_tok, v_tok, mask, ctx.scale, ctx.chunk, grads, *rng, p.lat, p.tok, p.accumulate)
            return grads["r_lat"], grads["v_lat"]

        parts = _run(work, ctx.ranges)
        g_rlat, g_vlat = (sum(p[i] for p in parts).transpose(1, 2).reshape(B, H, M, d) for i in (0, 1))
        g_tok = (None, None, d_packed) if ctx.packed else (tok_grads["r_tok"], tok_grads["v_tok"], None)
        return g_rlat, None if v_lat is None else g_vlat, *g_tok, None, None, None, None


def _backward_pass(rl, r_tok, v_tok, mask, scale, C, grads, n_a, n_b, lat: LatentGrad | None = None,
                   tok: TokenGrad | None = None, accumulate: bool = False):
    """The gradients of the latents' and/or the tokens' direction over tokens n_a:n_b, one block at a time.

    E = exp2(S - row_off_i - col_off_j) is recomputed per block. With the tokens' direction in the pass it is
    P_tok (col_off = lse_tok), and P_lat = E * g_i * h_j. With X = scale * [g dO_lat, -g D_lat, V_lat, -1]
    and Y_j = [h_j V_tok_j, h_j, dO_tok_j, D_tok_j], dS = E * (Y @ X^T) covers both directions in one matmul.
    Gradients of R_lat and V_lat accumulate transposed, (BH, d, M), which keeps every matmul's layout fast.
    """
    BH, M, d = rl.shape
    B, H = r_tok.shape[:2]
    rl2t = (rl * (scale * _LOG2E)).transpose(1, 2)
    cols = []
    if lat is not None:
        g, h = lat.g, lat.h
        gd = lat.d_lat if g is None else lat.d_lat * g
        cols += [gd * scale, (lat.D_lat if g is None else lat.D_lat * g) * -scale]
    if tok is not None:
        cols += [tok.v_lat * scale, rl.new_full((BH, M, 1), -scale)]
    xt = torch.cat(cols, dim=2).transpose(1, 2)  # (BH, K, M)
    k = xt.shape[1]
    row_off = None if lat is None or lat.row_off is None else lat.row_off[:, None, :]
    S, dS = rl.new_empty(BH, C, M), rl.new_empty(BH, C, M)
    Y = rl.new_empty(BH, C, k)
    buf = rl.new_empty(3, BH * C * d)
    for n0, n1 in _blocks(n_a, n_b, C):
        n = n1 - n0
        rt = _rows(r_tok, n0, n1, buf[0])
        e = torch.bmm(rt, rl2t, out=_block(S, n))
        if row_off is not None:
            e.sub_(row_off)
            if mask is not None:  # padding may exceed a latent's log-sum-exp: exp2 would overflow, then inf * 0
                e.view(B, H, n, M).masked_fill_(mask[:, None, n0:n1, None], float("-inf"))
        if tok is not None:
            e.sub_(tok.col_off[:, n0:n1, None])
        e.exp2_()
        y = Y[:, :n]
        j = 0
        if lat is not None:
            hc = None if h is None else h[:, n0:n1, None]
            if hc is None:
                y[:, :, :d].view(B, H, n, d).copy_(v_tok[:, :, n0:n1])
                y[:, :, d].fill_(1.0)
            else:
                torch.mul(v_tok[:, :, n0:n1], hc.view(B, H, n, 1), out=y[:, :, :d].view(B, H, n, d))
                y[:, :, d:d + 1].copy_(hc)
            j = d + 1
            dv = _store(grads["v_tok"], n0, n1, lambda out, e=e: torch.bmm(e, gd, out=out), buf[2])
            if hc is not None:  # P_lat^T dO_lat = h * (E^T @ (g dO_lat))
                dv.mul_(hc.view(B, H, n, 1))
        if tok is not None:
            dto = tok.d_tok[:, :, n0:n1]
            y[:, :, j:j + d].view(B, H, n, d).copy_(dto)
            prod = torch.mul(dto, tok.tok[:, :, n0:n1], out=buf[1, : BH * n * d].view(B, H, n, d))
            torch.sum(prod, dim=3, out=y[:, :, j + d].view(B, H, n))
            grads["v_lat"].baddbmm_(y[:, :, j:j + d].transpose(1, 2), e)
        ds = torch.bmm(y, xt, out=_block(dS, n)).mul_(e)
        grads["r_lat"].baddbmm_(rt.transpose(1, 2), ds)
        _store(grads["r_tok"], n0, n1, lambda out, ds=ds: torch.bmm(ds, rl, out=out), buf[2], accumulate)


@eager_under_compile  # a kernel already: torch.compile leaves it out of the graph
def fused_bidirectional_attention(r_lat: Tensor, v_lat: Tensor | None, r_tok: Tensor, v_tok: Tensor, scale: float,
                                  padding_mask: Tensor | None = None, chunk: int | None = None,
                                  packed_tok: Tensor | None = None,
                                  shard: TokenShard | None = None) -> tuple[Tensor, Tensor | None]:
    """Both directions of BiXT's attention in one pass over the tokens; see the module docstring.

    r_lat, v_lat: (B, H, M, d), v_lat None for the one-sided form; r_tok, v_tok: (B, H, N, d); padding_mask (B, N)
    bool, True marking padding. `chunk` overrides the tokens per chunk (default: `chunk_size`). `packed_tok`: the
    (B, N, 2 * H * d) projection r_tok and v_tok are `bixt.nn.layers.split_heads` of; given, the op takes it as its
    input and returns its gradient whole, written in place, instead of two gradients that autograd would stack
    and copy (100 MB each at 65k tokens, H * d = 192). `shard`: the tokens are this process's part of the
    samples' tokens (bixt.nn.sharding); the latents' update is over all processes' tokens.
    """
    B, H, M, d = r_lat.shape
    check_padding_mask(padding_mask, (B, r_tok.shape[2]))
    chunk = chunk or chunk_size(B, H, M, d)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if packed_tok is not None:
        halves = split_heads(packed_tok, 2, H)
        if not all(a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()
                   for a, b in zip(halves, (r_tok, v_tok), strict=True)):
            raise ValueError("packed_tok must be the tensor r_tok and v_tok were split from by "
                             "bixt.nn.layers.split_heads(packed_tok, 2, heads); pass packed_tok=None otherwise")
        r_tok = v_tok = None
    dtype = r_lat.dtype
    if dtype in (torch.float16, torch.bfloat16):  # running sums need float32; the inputs are cast per call
        r_lat, v_lat, r_tok, v_tok, packed_tok = (None if t is None else t.float()
                                                  for t in (r_lat, v_lat, r_tok, v_tok, packed_tok))
    lat, tok = FusedBiDirectionalAttention.apply(r_lat, v_lat, r_tok, v_tok, packed_tok, padding_mask, scale, chunk,
                                                 shard)
    return lat.to(dtype), None if tok is None else tok.to(dtype)
