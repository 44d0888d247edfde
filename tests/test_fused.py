"""The fused backend: equal to `math` (outputs and all four gradients), gradcheck, extreme logits, memory, FLOPs."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bixt.nn.fused as fused
from bixt.measure.flops import FUSED_OP, fused_flop_jit
from bixt.nn.attention import BiDirectionalCrossAttention, bidirectional_attention
from bixt.nn.fused import chunk_size, fused_bidirectional_attention, fused_macs


def random_inputs(B, H, M, N, d, masked, dtype=torch.float32):
    t = [torch.randn(B, H, L, d, dtype=dtype, requires_grad=True) for L in (M, M, N, N)]
    mask = None
    if masked:
        mask = torch.rand(B, N) < 0.3
        mask[:, 0] = False  # every sample keeps a token
    return t, mask


@pytest.fixture
def three_ranges(monkeypatch):
    """Split even short inputs into three token ranges (pool threads), so every test also covers the merge."""
    monkeypatch.setattr(fused, "_MIN_TOKENS_PER_THREAD", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def outputs_and_grads(inputs, mask, **kw):
    lat, tok = bidirectional_attention(*inputs, padding_mask=mask, **kw)
    g = torch.Generator().manual_seed(1)  # the same random cotangents for every backend
    loss = (lat * torch.randn(lat.shape, generator=g, dtype=lat.dtype)).sum()
    if tok is not None:
        loss = loss + (tok * torch.randn(tok.shape, generator=g, dtype=tok.dtype)).sum()
    grads = torch.autograd.grad(loss, [t for t in inputs if t is not None])
    return [lat] + ([] if tok is None else [tok]) + list(grads)


# (B, H, M, N, d, chunk): N not a multiple of the chunk, N < chunk, N == chunk, M = 1, N = 1, batch > 1.
SHAPES = [(1, 1, 1, 1, 8, 4), (2, 3, 5, 17, 8, 4), (3, 2, 1, 33, 16, 8), (2, 6, 64, 200, 32, 64),
          (1, 4, 7, 3, 4, 16), (2, 2, 9, 48, 8, 48), (1, 2, 16, 100, 32, None)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("one_sided", [False, True])
def test_fused_equals_math_outputs_and_gradients(shape, masked, one_sided, monkeypatch, three_ranges):
    *dims, chunk = shape
    if chunk is not None:  # None: the cache-derived default
        monkeypatch.setattr(fused, "chunk_size", lambda *a, **k: chunk)
    (r_lat, v_lat, r_tok, v_tok), mask = random_inputs(*dims, masked)
    inputs = [r_lat, None if one_sided else v_lat, r_tok, v_tok]
    ref = outputs_and_grads(inputs, mask, backend="math")
    got = outputs_and_grads(inputs, mask, backend="fused")
    assert len(got) == len(ref) == (4 if one_sided else 6)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_on_the_modules_strided_layout(B, packed, three_ranges):
    """r/v as the module makes them: heads split out of one projection per side (non-contiguous views). Given
    that projection (packed_tok), the op returns its gradient whole; the gradients equal math's either way."""
    from bixt.nn.layers import split_heads

    H, M, N, d = 3, 6, 50, 8
    rv_lat, rv_tok = torch.randn(B, M, 2 * H * d, requires_grad=True), torch.randn(B, N, 2 * H * d, requires_grad=True)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[-1, 30:] = True
    g_lat, g_tok = torch.randn(B, H, M, d), torch.randn(B, H, N, d)
    results = []
    for run in ("math", "fused"):
        r_lat, v_lat = split_heads(rv_lat, 2, H)
        r_tok, v_tok = split_heads(rv_tok, 2, H)
        if run == "math":
            lat, tok = bidirectional_attention(r_lat, v_lat, r_tok, v_tok, padding_mask=mask, backend="math")
        else:
            lat, tok = fused_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, d**-0.5, mask, chunk=16,
                                                     packed_tok=rv_tok if packed else None)
            # Heads come back laid out token-major, so merging them for the output projection is a view.
            assert tok.transpose(1, 2).is_contiguous()
        results.append([lat, tok, *torch.autograd.grad((lat * g_lat).sum() + (tok * g_tok).sum(), (rv_lat, rv_tok))])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_tok_must_be_what_the_token_inputs_were_split_from():
    from bixt.nn.layers import split_heads

    rv = torch.randn(1, 20, 2 * 2 * 4)
    r_lat, v_lat = torch.randn(2, 1, 2, 3, 4).unbind(0)
    r_tok, v_tok = split_heads(rv, 2, 2)
    with pytest.raises(ValueError, match="packed_tok must be the tensor r_tok and v_tok were split from"):
        fused_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, 0.5, packed_tok=rv.clone())
    with pytest.raises(ValueError, match="packed_tok must be"):
        fused_bidirectional_attention(r_lat, v_lat, v_tok, r_tok, 0.5, packed_tok=rv)


@pytest.mark.parametrize("one_sided", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck_float64(one_sided, shared, monkeypatch, three_ranges):
    if not shared:  # force the per-latent-offset path (normally taken only for extreme similarities)
        monkeypatch.setattr(fused, "_TINY", float("inf"))
    (r_lat, v_lat, r_tok, v_tok), mask = random_inputs(2, 2, 3, 11, 4, True, torch.float64)
    inputs = (r_lat, None if one_sided else v_lat, r_tok, v_tok)

    def fn(*args):
        lat, tok = fused_bidirectional_attention(*args, 0.7, mask, chunk=4)
        return lat if tok is None else (lat, tok)

    assert torch.autograd.gradcheck(fn, inputs)


def float64_reference(r_lat, v_lat, r_tok, v_tok, mask, scale):
    """Independent reference: einsum in float64."""
    r_lat, v_lat, r_tok, v_tok = (t.detach().double().requires_grad_() for t in (r_lat, v_lat, r_tok, v_tok))
    s = torch.einsum("bhmd,bhnd->bhmn", r_lat, r_tok) * scale
    s_lat = s if mask is None else s.masked_fill(mask[:, None, None, :], float("-inf"))
    lat = torch.einsum("bhmn,bhnd->bhmd", s_lat.softmax(3), v_tok)
    tok = torch.einsum("bhmn,bhmd->bhnd", s.softmax(2), v_lat)
    return (lat, tok), (r_lat, v_lat, r_tok, v_tok)


@pytest.mark.parametrize("guard", [True, False])
def test_extreme_similarities_fall_back_to_per_latent_offsets(guard, monkeypatch, three_ranges):
    """One latent's similarities sit ~130 below the head's maximum: one shared exp would underflow to 0/0."""
    if not guard:
        monkeypatch.setattr(fused, "_TINY", 0.0)
    B, H, M, N, d = 2, 2, 5, 60, 8
    u = torch.randn(d)
    u = u / u.norm() * 17
    r_tok = (u + 0.5 * torch.randn(B, H, N, d)).requires_grad_()
    r_lat = torch.randn(B, H, M, d) * 0.3 + u
    r_lat[:, :, 0] = -0.2 * u
    r_lat.requires_grad_()
    v_lat, v_tok = torch.randn(B, H, M, d, requires_grad=True), torch.randn(B, H, N, d, requires_grad=True)
    mask = torch.rand(B, N) < 0.3
    mask[:, 0] = False
    (ref_lat, ref_tok), ref_in = float64_reference(r_lat, v_lat, r_tok, v_tok, mask, d**-0.5)
    lat, tok = fused_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, d**-0.5, mask, chunk=16)
    if not guard:  # the test is extreme enough to need the fallback
        assert not torch.isfinite(lat).all()
        return
    g_lat, g_tok = torch.randn_like(lat), torch.randn_like(tok)
    grads = torch.autograd.grad((lat * g_lat).sum() + (tok * g_tok).sum(), (r_lat, v_lat, r_tok, v_tok))
    ref_grads = torch.autograd.grad((ref_lat * g_lat).sum() + (ref_tok * g_tok).sum(), ref_in)
    for a, b in zip((lat, tok, *grads), (ref_lat, ref_tok, *ref_grads), strict=True):
        # relative to the tensor's scale: similarities ~100 make float32 rounding of A itself ~1e-5
        torch.testing.assert_close(a.double(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_m_by_n_tensor_forward_or_backward():
    B, H, M, N, d = 1, 2, 32, 512, 4  # M x N dwarfs every other tensor (N x d, M x chunk)
    (r_lat, v_lat, r_tok, v_tok), _ = random_inputs(B, H, M, N, d, False)
    with LargestTensor() as rec:
        lat, tok = fused_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, 0.5, chunk=64)
        torch.autograd.grad(lat.sum() + tok.sum(), (r_lat, v_lat, r_tok, v_tok))
    assert rec.largest <= B * H * M * 64 < B * H * M * N // 4
    with LargestTensor() as rec:  # the check can fail: math materialises the matrix
        bidirectional_attention(r_lat, v_lat, r_tok, v_tok, backend="math")
    assert rec.largest == B * H * M * N


def test_auto_picks_fused_for_long_inputs_but_never_with_dropout():
    (r_lat, v_lat, r_tok, v_tok), _ = random_inputs(1, 2, 4, 4096, 8, False)
    with pytest.raises(ValueError, match="no attention dropout: use backend 'auto' or 'sdpa'"):
        bidirectional_attention(r_lat, v_lat, r_tok, v_tok, dropout_p=(0.1, 0.1), backend="fused")
    # The fused backend lays the token update out token-major: (B, H, N, d) over (B, N, H, d) memory.
    # With a backward pass to follow it wins from 4,096 tokens in the batch, for inference from 8,192.
    r_long, v_long = (torch.cat([t, t], dim=2).detach() for t in (r_tok, v_tok))
    for n, grad, fused_expected in ((4096, True, True), (1024, True, False), (4096, False, False),
                                    (8192, False, True)):
        with torch.set_grad_enabled(grad):
            _, tok = bidirectional_attention(r_lat, v_lat, r_long[:, :, :n], v_long[:, :, :n], backend="auto")
        assert tok.transpose(1, 2).is_contiguous() == fused_expected
    attn = BiDirectionalCrossAttention(16, num_heads=2, attn_drop=0.5, backend="auto")
    lat, tok = torch.randn(1, 4, 16), torch.randn(1, 4096, 16)
    ref = attn.eval()(lat, tok)[0]
    assert not torch.allclose(attn.train()(lat, tok)[0], ref)  # auto ran with dropout (sdpa), no error
    attn.backend = "fused"
    with pytest.raises(ValueError, match="no attention dropout"):
        attn(lat, tok)


def test_chunk_size_from_cache_and_override():
    c = chunk_size(1, 6, 64, 32, cache=32 * 1024**2, threads=1)
    assert c % 64 == 0 and 256 <= c <= 16384
    assert 1 * 6 * c * (2 * 64 + 6 * 32) * 4 <= 16 * 1024**2  # half the cache
    assert chunk_size(1, 6, 64, 32, cache=32 * 1024**2, threads=2) == c // 2 // 64 * 64  # threads share it
    assert chunk_size(1, 6, 64, 32, cache=128 * 1024**2, threads=1) > c  # bigger cache, bigger chunks
    assert chunk_size(4, 6, 64, 32, cache=32 * 1024**2, threads=1) < c  # more heads share the cache
    with pytest.raises(ValueError, match="chunk must be a positive"):
        fused_bidirectional_attention(*random_inputs(1, 1, 2, 5, 4, False)[0], 0.5, chunk=-1)
    with pytest.raises(ValueError, match="padding_mask must be"):
        fused_bidirectional_attention(*random_inputs(1, 1, 2, 5, 4, False)[0], 0.5, torch.zeros(1, 4).bool())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B, H, N", [(1, 5, 70), (3, 1, 70), (1, 1, 10)])
@pytest.mark.parametrize("one_sided", [False, True])
def test_token_ranges_threads_and_inference_mode(threads, B, H, N, one_sided, monkeypatch):
    """Token ranges run in pool threads and the latents' partial sums are merged; one thread runs inline. Results
    agree, inference mode carries into the workers, and torch's thread count is restored."""
    monkeypatch.setattr(fused, "_MIN_TOKENS_PER_THREAD", 4)
    (r_lat, v_lat, r_tok, v_tok), mask = random_inputs(B, H, 6, N, 8, True)
    mask[-1, N // 2:] = True  # the last range of the last sample is all padding: its partial sums are empty
    inputs = [r_lat, None if one_sided else v_lat, r_tok, v_tok]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert len(fused._token_ranges(N, r_lat.device)) == min(threads, N // 4)
        ref = outputs_and_grads(inputs, mask, backend="math")
        got = outputs_and_grads(inputs, mask, backend="fused")
        assert torch.get_num_threads() == threads
        with torch.inference_mode():
            inf = bidirectional_attention(*inputs, padding_mask=mask, backend="fused")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inf[0], ref[0], atol=1e-5, rtol=1e-5)


def test_concurrent_callers_restore_the_thread_count():
    from concurrent.futures import ThreadPoolExecutor

    (r_lat, v_lat, r_tok, v_tok), mask = random_inputs(1, 4, 6, 300, 8, True)
    ref = bidirectional_attention(r_lat, v_lat, r_tok, v_tok, padding_mask=mask, backend="math")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(3) as ex:
            outs = list(ex.map(lambda _: fused_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, 8**-0.5, mask, 64),
                               range(6)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for lat, tok in outs:
        torch.testing.assert_close(lat, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tok, ref[1], atol=1e-5, rtol=1e-5)


def test_half_inputs_compute_in_float32():
    (r_lat, v_lat, r_tok, v_tok), _ = random_inputs(1, 2, 4, 40, 8, False)
    ref = bidirectional_attention(r_lat, v_lat, r_tok, v_tok, backend="math")
    half = [t.detach().bfloat16() for t in (r_lat, v_lat, r_tok, v_tok)]
    got = bidirectional_attention(*half, backend="fused")
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("one_sided", [False, True])
def test_fvcore_counts_the_fused_op_like_the_math_backend(one_sided):
    from fvcore.nn import FlopCountAnalysis

    class Attn(torch.nn.Module):
        def __init__(self, backend):
            super().__init__()
            self.inner = BiDirectionalCrossAttention(32, num_heads=4, one_sided=one_sided, backend=backend)

        def forward(self, lat, tok, mask):
            out = self.inner(lat, tok, mask)
            return out[0] if one_sided else out

    lat, tok, mask = torch.randn(2, 6, 32), torch.randn(2, 50, 32), torch.zeros(2, 50, dtype=torch.bool)
    counts = {}
    for backend in ("math", "fused"):
        fl = FlopCountAnalysis(Attn(backend).eval(), (lat, tok, mask)).tracer_warnings("none")
        fl.unsupported_ops_warnings(False)
        if backend == "fused":
            fl.total()
            assert FUSED_OP in fl.unsupported_ops()  # the name the profiler registers the handle under
            fl = fl.set_op_handle(FUSED_OP, fused_flop_jit)
        counts[backend] = fl.total()
        assert not any(op.startswith("prim::PythonOp") for op in fl.unsupported_ops())
    assert counts["fused"] == counts["math"]
    assert fused_macs(2, 4, 6, 50, 8, not one_sided) == 2 * 4 * 6 * 50 * 8 * (2 if one_sided else 3)


@pytest.mark.parametrize("one_sided", [False, True])
def test_fused_flop_jit_on_separate_token_inputs(one_sided):
    """The handle reads both call forms: r_tok and v_tok (here) or one packed projection (the module, above)."""
    from fvcore.nn import FlopCountAnalysis

    class Core(torch.nn.Module):
        def forward(self, r_lat, v_lat, r_tok, v_tok):
            lat, tok = fused_bidirectional_attention(r_lat, None if one_sided else v_lat, r_tok, v_tok, 0.5)
            return lat if one_sided else (lat, tok)

    (r_lat, v_lat, r_tok, v_tok), _ = random_inputs(2, 3, 5, 40, 8, False)
    fl = FlopCountAnalysis(Core(), (r_lat, v_lat, r_tok, v_tok)).tracer_warnings("none")
    fl.unsupported_ops_warnings(False)
    assert fl.set_op_handle(FUSED_OP, fused_flop_jit).total() == fused_macs(2, 3, 5, 40, 8, not one_sided)
