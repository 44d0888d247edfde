"""Fused bi-directional attention: one similarity computation per token chunk, no M x N tensor kept.

The tokens are processed in chunks of C. For one chunk the block S = R_tok R_lat^T * scale is C x M (token-major):
- the tokens' softmax over the M latents is complete inside the block (along memory), so P_tok is formed in place
  and the tokens' output is written by one matmul, straight into the output;
- the latents' softmax over all N tokens is an online softmax (FlashAttention-style running sums).

One exponential per block serves both directions. The latents need exp(S_ji - m) with one offset m per head:
that is P_tok[j, i] * f_j with f_j = exp(lse_tok_j - m) <= 1, a factor per TOKEN, folded into the token values
(P_tok^T @ (f * V_tok)) instead of a second pass over the block; padding sets f_j = 0. It loses precision only for
a latent whose similarities all sit ~40 below its head's maximum; that is detected (its softmax denominator is
tiny) and the latents are then recomputed with per-latent offsets (`_latents_per_row`, also the one-sided path).

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

import torch
from torch import Tensor

from bixt.layers import check_padding_mask

# A latent whose softmax denominator (relative to its head's offset) falls below this has lost precision to
# underflow in the shared-exp forward: recompute the latents with per-latent offsets.
_TINY = 2.0**-60
_DEFAULT_CACHE = 16 * 1024**2
_AUTO_MIN_TOKENS = 4096
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


def chunk_size(batch: int, heads: int, latents: int, head_dim: int, cache: int | None = None) -> int:
    """Tokens per chunk: one chunk's working set fills half of the last-level cache.

    Per token and head a chunk holds two M-long float32 columns (the block and the backward's dS) and about six
    d-long rows (R, V, output, gradients). Measured on a 2-core Zen 3 (512 KiB L2, 32 MiB L3): L2-sized chunks
    (~128 tokens at M=64, H=6) are 20-40 % slower than LLC-sized ones (1-2k tokens), because each of the ~40
    torch ops per chunk costs a fixed dispatch and thread fork/join (far more when the cores are shared).
    """
    per_token = batch * heads * (2 * latents + 6 * head_dim) * 4
    c = (cache or cache_bytes()) // 2 // per_token
    return int(min(max(256, c // 64 * 64), 16384))


def fused_macs(batch: int, heads: int, latents: int, tokens: int, head_dim: int, two_sided: bool = True) -> int:
    """Multiply-accumulates of one forward call: the similarity once plus one value product per direction."""
    return batch * heads * latents * tokens * head_dim * (3 if two_sided else 2)


def fused_wins(r_lat: Tensor, r_tok: Tensor) -> bool:
    """Where `auto` picks this backend over sdpa: CPU, float32/64, at least 4,096 tokens in the batch.

    Measured on a 2-core Zen 3 (M=64, H=6, d=32; forward and forward+backward alike): fused/sdpa time 1.1-1.2 at
    1 x 1,024 tokens, ~1.0 at 8 x 196 and 1 x 2,304, 0.86 at 1 x 4,096, 0.73 at 1 x 16,384, 0.82 at 8 x 3,136.
    """
    return (r_lat.device.type == "cpu" and r_lat.dtype in (torch.float32, torch.float64)
            and r_tok.shape[0] * r_tok.shape[2] >= _AUTO_MIN_TOKENS)


def fvcore_handle(inputs, outputs) -> int:
    """fvcore op handle for FVCORE_OP: MACs of one call from the traced input shapes.

    jit records only the tensor arguments: r_lat, [v_lat], r_tok, v_tok, [padding_mask]; four 4-D inputs mean
    two-sided. Register with `FlopCountAnalysis(...).set_op_handle(FVCORE_OP, fvcore_handle)`.
    """
    shapes = [v.type().sizes() for v in inputs if v.isCompleteTensor() and len(v.type().sizes()) == 4]
    if len(shapes) not in (3, 4):
        raise ValueError(f"{FVCORE_OP} traced with {len(shapes)} complete 4-D inputs, expected 3 or 4: "
                         "trace with concrete tensors")
    (B, H, M, d), N = shapes[0], shapes[-1][2]
    return fused_macs(B, H, M, N, d, two_sided=len(shapes) == 4)


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


def _latents_per_row(rl2t: Tensor, r_tok: Tensor, v_tok: Tensor, mask: Tensor | None, C: int):
    """The latents' direction alone, with a running max per latent: the one-sided forward and the fallback.

    rl2t: (BH, d, M), R_lat pre-scaled by scale * log2(e). Returns the latent update (BH, M, d) and the
    per-latent log-sum-exp in base 2 (BH, M).
    """
    BH, d, M = rl2t.shape
    B, H, N, _ = r_tok.shape
    S = rl2t.new_empty(BH, C, M)
    buf = rl2t.new_empty(2, BH * C * d)
    acc_t = rl2t.new_zeros(BH, d, M)
    l_ = rl2t.new_zeros(BH, 1, M)
    m = rl2t.new_full((BH, 1, M), torch.finfo(rl2t.dtype).min)
    for n0 in range(0, N, C):
        n1 = min(n0 + C, N)
        e = torch.bmm(_rows(r_tok, n0, n1, buf[0]), rl2t, out=_block(S, n1 - n0))
        if mask is not None:
            e.view(B, H, n1 - n0, M).masked_fill_(mask[:, None, n0:n1, None], float("-inf"))
        m_new = torch.maximum(m, e.amax(dim=1, keepdim=True))
        alpha = (m - m_new).exp2_()
        m = m_new
        e.sub_(m).exp2_()
        l_.mul_(alpha).add_(e.sum(dim=1, keepdim=True))
        acc_t.mul_(alpha).baddbmm_(_rows(v_tok, n0, n1, buf[1]).transpose(1, 2), e)
    return (acc_t / l_).transpose(1, 2), (m + l_.log2()).squeeze(1)


def _forward_group(r_lat, v_lat, r_tok, v_tok, mask, scale, C, tok):
    """Forward for one group of heads; writes the token update into `tok`. Returns the latent update (BH, M, d),
    the base-2 log-sum-exps per latent (BH, M) and per token (BH, N), the head offsets m (BH, 1), and whether the
    shared-exp latents were exact (see the module docstring)."""
    B, H, M, d = r_lat.shape
    N, BH = r_tok.shape[2], B * H
    rl2t = (r_lat * (scale * _LOG2E)).reshape(BH, M, d).transpose(1, 2)
    if v_lat is None:  # one-sided: the latents' online softmax with per-latent offsets is all there is
        return (*_latents_per_row(rl2t, r_tok, v_tok, mask, C), None, None, False)
    vl = v_lat.reshape(BH, M, d).contiguous()
    S = rl2t.new_empty(BH, C, M)
    buf = rl2t.new_empty(3, BH * C * (d + 1))
    lse_tok = rl2t.new_empty(BH, N)
    acc_t = rl2t.new_zeros(BH, d + 1, M)  # last row: the latents' softmax denominators
    m = rl2t.new_full((BH, 1), torch.finfo(rl2t.dtype).min)
    for n0 in range(0, N, C):
        n1 = min(n0 + C, N)
        n = n1 - n0
        e = torch.bmm(_rows(r_tok, n0, n1, buf[0]), rl2t, out=_block(S, n))
        cmax = e.amax(dim=2, keepdim=True)
        e.sub_(cmax).exp2_()
        colsum = e.sum(dim=2, keepdim=True)
        p = e.div_(colsum)  # the tokens' softmax over latents, complete in this chunk
        _store(tok, n0, n1, lambda out, p=p: torch.bmm(p, vl, out=out), buf[2])
        lse = torch.add(cmax, colsum.log2_(), out=lse_tok[:, n0:n1, None]).squeeze(2)
        if mask is not None:
            lse = lse.view(B, H, n).masked_fill(mask[:, None, n0:n1], float("-inf")).view(BH, n)
        # The latents' weights exp2(S - m) = p * f_j, f_j = exp2(lse_j - m) <= 1: a factor per token.
        m_new = torch.maximum(m, lse.amax(dim=1, keepdim=True))
        alpha = (m - m_new).exp2_()[:, :, None]
        m = m_new
        vf = buf[1, : BH * n * (d + 1)].view(BH, n, d + 1)
        f = torch.sub(lse, m, out=vf[:, :, d]).exp2_()
        torch.mul(v_tok[:, :, n0:n1], f.view(B, H, n, 1), out=vf[:, :, :d].view(B, H, n, d))
        acc_t.mul_(alpha).baddbmm_(vf.transpose(1, 2), p)
    l_ = acc_t[:, d:]
    if l_.min() >= _TINY:
        return (acc_t[:, :d] / l_).transpose(1, 2), m + l_.squeeze(1).log2(), lse_tok, m, True
    # Some latent's similarities all sit far below its head's maximum: per-latent offsets.
    return (*_latents_per_row(rl2t, r_tok, v_tok, mask, C), lse_tok, m, False)


def _backward_group(r_lat, v_lat, r_tok, v_tok, mask, lat, tok, lse_lat, lse_tok, m, shared, d_lat, d_tok,
                    scale, C, grads):
    """Backward for one group of heads, written into the group's slices of `grads`."""
    B, H, M, d = r_lat.shape
    N, BH = r_tok.shape[2], B * H
    rl = r_lat.reshape(BH, M, d).contiguous()
    d_lat = d_lat.reshape(BH, M, d)
    lat, lse_lat = lat.reshape(BH, M, d), lse_lat.reshape(BH, M)
    keep = None if mask is None else (~mask)[:, None].expand(B, H, N).reshape(BH, N).to(rl.dtype)
    lat_pass = dict(d_lat=d_lat, D_lat=(d_lat * lat).sum(dim=2, keepdim=True), keep=keep)
    acc = dict(r_lat=rl.new_zeros(BH, d, M), v_lat=rl.new_zeros(BH, d, M), r_tok=grads["r_tok"],
               v_tok=grads["v_tok"])
    args = (rl, r_tok, v_tok, mask, scale, C, acc)
    if v_lat is None:
        _backward_pass(*args, lat=dict(lat_pass, row_off=lse_lat))
    else:
        lse_tok, m = lse_tok.reshape(BH, N), m.reshape(BH, 1)
        tok_pass = dict(v_lat=v_lat.reshape(BH, M, d), d_tok=d_tok, tok=tok, col_off=lse_tok)
        if shared:  # one pass: P_lat = P_tok * g_i * h_j
            g = (m - lse_lat).exp2_()[:, :, None]
            h = (lse_tok - m).exp2_()
            _backward_pass(*args, lat=dict(lat_pass, g=g, h=h if keep is None else h.mul_(keep)), tok=tok_pass)
        else:
            _backward_pass(*args, lat=dict(lat_pass, row_off=lse_lat))
            _backward_pass(*args, tok=tok_pass, accumulate=True)
        grads["v_lat"].copy_(acc["v_lat"].transpose(1, 2).view(B, H, M, d))
    grads["r_lat"].copy_(acc["r_lat"].transpose(1, 2).view(B, H, M, d))


_POOL: ThreadPoolExecutor | None = None


def _head_groups(B: int, H: int, device: torch.device) -> list[tuple[slice, slice]]:
    """(batch, head) slices, one per intra-op thread on CPU: heads when there are enough, else batch entries."""
    T = torch.get_num_threads() if device.type == "cpu" else 1
    if T > 1 and max(B, H) > 1:
        n, by_head = (H, True) if H > 1 else (B, False)
        cuts = [n * i // min(T, n) for i in range(min(T, n) + 1)]
        parts = [slice(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
        return [(slice(None), p) if by_head else (p, slice(None)) for p in parts]
    return [(slice(None), slice(None))]


def _run(fn, items: list) -> list:
    """fn over items: inline for one item, else one item per pool thread with single-threaded torch ops.

    Each group of heads is independent, so threads never wait on each other until the end, whereas torch's own
    intra-op threads meet at a barrier after every op (~40 per chunk): on a busy machine each barrier can cost a
    scheduler time slice (measured: 2-10x slowdowns). torch's thread count is set to 1 for the duration (a
    process-wide setting; restored after) so the groups do not oversubscribe the cores.
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


class FusedBiDirectionalAttention(torch.autograd.Function):
    """(r_lat, v_lat | None, r_tok, v_tok, padding_mask | None, scale, chunk) -> (latent update, token update | None).

    Shapes as `bixt.attention.bidirectional_attention`; the token update is a (B, H, N, d) view of (B, N, H, d)
    memory. Groups of heads run in parallel threads (`_run`).
    """

    @staticmethod
    def forward(ctx, r_lat, v_lat, r_tok, v_tok, padding_mask, scale, chunk):
        B, H, M, d = r_lat.shape
        N, C = r_tok.shape[2], min(chunk, r_tok.shape[2])
        lat, lse_lat = r_lat.new_empty(B, H, M, d), r_lat.new_empty(B, H, M)
        tok = lse_tok = m = None
        if v_lat is not None:
            tok, lse_tok, m = _token_major(B, H, N, d, r_lat), r_lat.new_empty(B, H, N), r_lat.new_empty(B, H, 1)
        groups = _head_groups(B, H, r_lat.device)

        def work(g):
            def part(t):
                return None if t is None else t[g]
            mask = None if padding_mask is None else padding_mask[g[0]]
            out = _forward_group(part(r_lat), part(v_lat), part(r_tok), part(v_tok), mask, scale, C, part(tok))
            for full, val in zip((lat, lse_lat, lse_tok, m), out[:4], strict=True):
                if full is not None:
                    full[g].copy_(val.view(full[g].shape))
            return out[4]

        ctx.shared = _run(work, groups)
        ctx.groups, ctx.scale, ctx.chunk = groups, scale, C
        ctx.save_for_backward(r_lat, v_lat, r_tok, v_tok, padding_mask, lat, tok, lse_lat, lse_tok, m)
        return lat, tok

    @staticmethod
    def backward(ctx, d_lat, d_tok):
        r_lat, v_lat, r_tok, v_tok, mask, lat, tok, lse_lat, lse_tok, m = ctx.saved_tensors
        B, H, M, d = r_lat.shape
        N = r_tok.shape[2]
        grads = dict(r_lat=torch.empty_like(r_lat, memory_format=torch.contiguous_format),
                     v_lat=None if v_lat is None else torch.empty_like(r_lat, memory_format=torch.contiguous_format),
                     r_tok=_token_major(B, H, N, d, r_lat), v_tok=_token_major(B, H, N, d, r_lat))

        def work(k):
            g = ctx.groups[k]

            def part(t):
                return None if t is None else t[g]
            _backward_group(*map(part, (r_lat, v_lat, r_tok, v_tok)), None if mask is None else mask[g[0]],
                            *map(part, (lat, tok, lse_lat, lse_tok, m)), ctx.shared[k], part(d_lat), part(d_tok),
                            ctx.scale, ctx.chunk, {name: part(t) for name, t in grads.items()})

        _run(work, list(range(len(ctx.groups))))
        return grads["r_lat"], grads["v_lat"], grads["r_tok"], grads["v_tok"], None, None, None


# How the op appears in a jit trace (fvcore's name for a custom autograd.Function).
FVCORE_OP = f"prim::PythonOp.{FusedBiDirectionalAttention.__name__}"


def _backward_pass(rl, r_tok, v_tok, mask, scale, C, grads, lat=None, tok=None, accumulate=False):
    """The gradients of the latents' and/or the tokens' direction, one chunk at a time.

    E = exp2(S - row_off_i - col_off_j) is recomputed per block. With the tokens' direction in the pass it is
    P_tok (col_off = lse_tok), and P_lat = E * g_i * h_j. With X = scale * [g dO_lat, -g D_lat, V_lat, -1]
    and Y_j = [h_j V_tok_j, h_j, dO_tok_j, D_tok_j], dS = E * (Y @ X^T) covers both directions in one matmul.
    Gradients of R_lat and V_lat accumulate transposed, (BH, d, M), which keeps every matmul's layout fast.
    """
    BH, M, d = rl.shape
    B, H, N, _ = r_tok.shape
    rl2t = (rl * (scale * _LOG2E)).transpose(1, 2)
    cols = []
    if lat is not None:
        g = lat.get("g")
        gd = lat["d_lat"] if g is None else lat["d_lat"] * g
        cols += [gd * scale, (lat["D_lat"] if g is None else lat["D_lat"] * g) * -scale]
        h = lat.get("h", lat["keep"])
    if tok is not None:
        cols += [tok["v_lat"] * scale, rl.new_full((BH, M, 1), -scale)]
    xt = torch.cat(cols, dim=2).transpose(1, 2)  # (BH, K, M)
    k = xt.shape[1]
    row_off = None if lat is None or "row_off" not in lat else lat["row_off"][:, None, :]
    S, dS = rl.new_empty(BH, C, M), rl.new_empty(BH, C, M)
    Y = rl.new_empty(BH, C, k)
    buf = rl.new_empty(3, BH * C * d)
    for n0 in range(0, N, C):
        n1 = min(n0 + C, N)
        n = n1 - n0
        rt = _rows(r_tok, n0, n1, buf[0])
        e = torch.bmm(rt, rl2t, out=_block(S, n))
        if row_off is not None:
            e.sub_(row_off)
            if mask is not None:  # padding may exceed a latent's log-sum-exp: exp2 would overflow, then inf * 0
                e.view(B, H, n, M).masked_fill_(mask[:, None, n0:n1, None], float("-inf"))
        if tok is not None:
            e.sub_(tok["col_off"][:, n0:n1, None])
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
            dto = tok["d_tok"][:, :, n0:n1]
            y[:, :, j:j + d].view(B, H, n, d).copy_(dto)
            prod = torch.mul(dto, tok["tok"][:, :, n0:n1], out=buf[1, : BH * n * d].view(B, H, n, d))
            torch.sum(prod, dim=3, out=y[:, :, j + d].view(B, H, n))
            grads["v_lat"].baddbmm_(y[:, :, j:j + d].transpose(1, 2), e)
        ds = torch.bmm(y, xt, out=_block(dS, n)).mul_(e)
        grads["r_lat"].baddbmm_(rt.transpose(1, 2), ds)
        _store(grads["r_tok"], n0, n1, lambda out, ds=ds: torch.bmm(ds, rl, out=out), buf[2], accumulate)


def fused_bidirectional_attention(r_lat: Tensor, v_lat: Tensor | None, r_tok: Tensor, v_tok: Tensor, scale: float,
                                  padding_mask: Tensor | None = None,
                                  chunk: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Both directions of BiXT's attention in one pass over the tokens; see the module docstring.

    r_lat, v_lat: (B, H, M, d), v_lat None for the one-sided form; r_tok, v_tok: (B, H, N, d); padding_mask (B, N)
    bool, True marking padding. `chunk` overrides the tokens per chunk (default: `chunk_size`).
    """
    B, H, M, d = r_lat.shape
    check_padding_mask(padding_mask, (B, r_tok.shape[2]))
    chunk = chunk or chunk_size(B, H, M, d)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    dtype = r_lat.dtype
    if dtype in (torch.float16, torch.bfloat16):  # running sums need float32; the inputs are cast per call
        r_lat, v_lat, r_tok, v_tok = (None if t is None else t.float() for t in (r_lat, v_lat, r_tok, v_tok))
    lat, tok = FusedBiDirectionalAttention.apply(r_lat, v_lat, r_tok, v_tok, padding_mask, scale, chunk)
    return lat.to(dtype), None if tok is None else tok.to(dtype)
