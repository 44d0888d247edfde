"""The bi-directional attention: backends agree with each other and with an independent float64 reference."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bixt.nn.attention import BiDirectionalCrossAttention, attention, bidirectional_attention

BACKENDS = ["math", "sdpa"]


def reference(r_lat, v_lat, r_tok, v_tok, mask):
    """Per sample and head with einsum in float64: softmax over tokens for latents, over latents for tokens."""
    r_lat, v_lat, r_tok, v_tok = (t.double() for t in (r_lat, v_lat, r_tok, v_tok))
    scores = torch.einsum("bhmd,bhnd->bhmn", r_lat, r_tok) / r_lat.shape[-1] ** 0.5
    lat_scores = scores if mask is None else scores.masked_fill(mask[:, None, None, :], float("-inf"))
    lat = torch.einsum("bhmn,bhnd->bhmd", torch.softmax(lat_scores, dim=3), v_tok)
    tok = torch.einsum("bhmn,bhmd->bhnd", torch.softmax(scores, dim=2), v_lat)
    return lat, tok


def random_inputs(B, H, M, N, d, masked):
    t = [torch.randn(B, H, L, d, requires_grad=True) for L in (M, M, N, N)]
    mask = None
    if masked:
        mask = torch.rand(B, N) < 0.3
        mask[:, 0] = False  # every sample keeps a token
    return t, mask


SHAPES = [(1, 1, 1, 1, 8), (2, 3, 5, 17, 8), (3, 2, 1, 33, 16), (2, 6, 64, 200, 32), (1, 4, 7, 3, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_backend_matches_float64_reference(backend, shape, masked):
    (r_lat, v_lat, r_tok, v_tok), mask = random_inputs(*shape, masked)
    lat, tok = bidirectional_attention(r_lat, v_lat, r_tok, v_tok, padding_mask=mask, backend=backend)
    ref_lat, ref_tok = reference(r_lat, v_lat, r_tok, v_tok, mask)
    torch.testing.assert_close(lat.double(), ref_lat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok.double(), ref_tok, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("one_sided", [False, True])
def test_backends_agree_on_outputs_and_gradients(shape, masked, one_sided):
    (r_lat, v_lat, r_tok, v_tok), mask = random_inputs(*shape, masked)
    results = {}
    for backend in BACKENDS:
        inputs = [r_lat, None if one_sided else v_lat, r_tok, v_tok]
        lat, tok = bidirectional_attention(*inputs, padding_mask=mask, backend=backend)
        assert (tok is None) == one_sided
        # A random cotangent per output, the same for every backend.
        g = torch.Generator().manual_seed(1)
        loss = (lat * torch.randn(lat.shape, generator=g)).sum()
        if tok is not None:
            loss = loss + (tok * torch.randn(tok.shape, generator=g)).sum()
        grads = torch.autograd.grad(loss, [t for t in inputs if t is not None])
        results[backend] = (lat, tok, grads)
    (lat_a, tok_a, g_a), (lat_b, tok_b, g_b) = results.values()
    torch.testing.assert_close(lat_a, lat_b, atol=1e-5, rtol=1e-5)
    if not one_sided:
        torch.testing.assert_close(tok_a, tok_b, atol=1e-5, rtol=1e-5)
    for ga, gb in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_give_nothing_to_latents(backend):
    attn = BiDirectionalCrossAttention(32, num_heads=4, backend=backend).eval()
    lat, tok = torch.randn(2, 6, 32), torch.randn(2, 20, 32)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 12:] = True
    mask[1, 5:] = True
    out, _ = attn(lat, tok, mask)
    changed = tok.clone()
    changed[mask] = 1e3 * torch.randn(int(mask.sum()), 32)
    out_changed, _ = attn(lat, changed, mask)
    torch.testing.assert_close(out, out_changed, atol=0, rtol=0)
    # ... and masking equals dropping: sample 0 with its 12 real tokens alone.
    alone, _ = attn(lat[:1], tok[:1, :12])
    torch.testing.assert_close(out[:1], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "fused"])
def test_module_backends_agree_with_gradients_on_weights(backend):
    a = BiDirectionalCrossAttention(48, 40, 24, num_heads=3, backend="math")
    b = BiDirectionalCrossAttention(48, 40, 24, num_heads=3, backend=backend)
    b.load_state_dict(a.state_dict())
    lat, tok = torch.randn(2, 5, 48), torch.randn(2, 30, 40)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 20:] = True
    outs = []
    for m in (a, b):
        la, to = m(lat, tok, mask)
        (la.square().sum() + to.square().sum()).backward()
        outs.append((la, to, {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    for n in outs[0][2]:
        torch.testing.assert_close(outs[0][2][n], outs[1][2][n], atol=1e-5, rtol=1e-5, msg=n)


def test_parameter_count_matches_paper_at_dim_192():
    attn = BiDirectionalCrossAttention(192, num_heads=6)
    assert sum(p.numel() for p in attn.parameters()) == 222_336
    one_sided = BiDirectionalCrossAttention(192, num_heads=6, one_sided=True)
    # R only for the latents, no token output projection.
    assert sum(p.numel() for p in one_sided.parameters()) == 222_336 - (192 * 192 + 192) - (192 * 192 + 192)


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_math_backend_similarity_is_m_by_n_not_n_by_n():
    B, H, M, N, d = 1, 2, 6, 300, 2  # d < M so the M x N matrix is the largest legitimate tensor
    (r_lat, v_lat, r_tok, v_tok), _ = random_inputs(B, H, M, N, d, False)
    with ShapeRecorder() as rec:
        bidirectional_attention(r_lat, v_lat, r_tok, v_tok, backend="math")
    assert max(rec.numels) == B * H * M * N  # the one similarity matrix (and its softmaxes)
    assert B * H * N * N not in rec.numels


def test_dropout_applies_in_training_only():
    attn = BiDirectionalCrossAttention(16, num_heads=2, attn_drop=0.5)
    lat, tok = torch.randn(2, 4, 16), torch.randn(2, 10, 16)
    attn.eval()
    ref = attn(lat, tok)
    torch.testing.assert_close(attn(lat, tok)[0], ref[0])
    attn.train()
    assert not torch.allclose(attn(lat, tok)[0], ref[0])
    assert not torch.allclose(attn(lat, tok)[1], ref[1])


def test_unknown_and_unavailable_backends_raise_clearly():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="CUDA only"):
        attention(q, q, q, backend="xformers")
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        BiDirectionalCrossAttention(32, num_heads=5)
