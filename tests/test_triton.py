"""The triton backend: equal to `math` (outputs and all four gradients), masks, ragged N, the module's packed layout,
a whole model, FLOP count and refusals.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are first
imported) on CPU tensors; with one they are compiled and run on CUDA. Skipped where triton is not installed.
"""
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'bixt[triton]', Linux)", allow_module_level=True)
CUDA = torch.cuda.is_available()
if not CUDA:
    from importlib.metadata import version

    if tuple(int(p) for p in version("triton").split(".")[:2]) < (3, 7):
        pytest.skip("Triton's interpreter before 3.7 cannot run loops with runtime bounds under numpy 2: "
                    "pip install 'triton>=3.7'", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported: before the import below

import bixt.nn.triton_attention as ta  # noqa: E402
from bixt.measure.flops import TRITON_OP, count_macs  # noqa: E402
from bixt.nn.attention import BiDirectionalCrossAttention, auto_bidirectional, bidirectional_attention  # noqa: E402
from bixt.nn.layers import split_heads  # noqa: E402

if not CUDA and not ta.INTERPRETING:
    pytest.skip("bixt.nn.triton_attention was imported before TRITON_INTERPRET=1 was set: run this file on its own",
                allow_module_level=True)
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 dot products in IEEE precision on a GPU (TF32 would miss 1e-5)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def reference(r_lat, v_lat, r_tok, v_tok, mask, scale):
    """Independent reference: einsum in float64 on the CPU."""
    r_lat, v_lat, r_tok, v_tok = (None if t is None else t.detach().cpu().double().requires_grad_()
                                  for t in (r_lat, v_lat, r_tok, v_tok))
    mask = None if mask is None else mask.cpu()
    s = torch.einsum("bhmd,bhnd->bhmn", r_lat, r_tok) * scale
    s_lat = s if mask is None else s.masked_fill(mask[:, None, None, :], float("-inf"))
    lat = torch.einsum("bhmn,bhnd->bhmd", s_lat.softmax(3), v_tok)
    tok = None if v_lat is None else torch.einsum("bhmn,bhmd->bhnd", s.softmax(2), v_lat)
    return (lat, tok), [t for t in (r_lat, v_lat, r_tok, v_tok) if t is not None]


def inputs(B, H, M, N, d, masked, one_sided=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, H, L, d, generator=g).to(DEVICE, dtype).requires_grad_() for L in (M, M, N, N)]
    if one_sided:
        t[1] = None
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=g) < 0.3
        mask[:, 0] = False  # every sample keeps a token
        mask = mask.to(DEVICE)
    return t, mask


def check(got_in, mask, scale, atol, rtol, packed=None):
    """Outputs and gradients of the triton op on `got_in` equal the float64 reference's."""
    lat, tok = ta.triton_bidirectional_attention(*got_in, scale, mask, packed_tok=packed)
    (ref_lat, ref_tok), ref_in = reference(*got_in, mask, scale)
    g = torch.Generator().manual_seed(1)
    c_lat = torch.randn(lat.shape, generator=g, dtype=torch.float64)
    c_tok = None if tok is None else torch.randn(tok.shape, generator=g, dtype=torch.float64)
    loss = (lat * c_lat.to(lat)).sum() + (0 if tok is None else (tok * c_tok.to(tok)).sum())
    leaves = [t for t in got_in if t is not None] if packed is None else [got_in[0], got_in[1], packed]
    leaves = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    ref_loss = (ref_lat * c_lat).sum() + (0 if ref_tok is None else (ref_tok * c_tok).sum())
    ref_grads = list(torch.autograd.grad(ref_loss, ref_in))
    if packed is not None:  # the packed gradient holds the r_tok and v_tok gradients through its two halves
        grads = [*grads[:-1], *(t.permute(0, 2, 1, 3) for t in split_heads(grads[-1], 2, got_in[0].shape[1]))]
        ref_grads[-2:] = [t.permute(0, 2, 1, 3) for t in ref_grads[-2:]]
    got = [lat] + ([] if tok is None else [tok]) + list(grads)
    ref = [ref_lat] + ([] if ref_tok is None else [ref_tok]) + ref_grads
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.detach().cpu().double(), b.detach(), atol=atol, rtol=rtol)


# (B, H, M, N, d): M = 1, N = 1, N not a multiple of any block, d not a power of two, M > 16, several spans
# (N > 16 with B x H < 4 gives several spans in the interpreter), batch > 1, BiXT-Ti's head shape.
SHAPES = [(1, 1, 1, 1, 8), (2, 3, 5, 17, 8), (3, 2, 1, 33, 16), (1, 1, 16, 100, 12), (2, 6, 64, 200, 32),
          (1, 4, 7, 3, 4), (1, 2, 24, 129, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("one_sided", [False, True])
def test_triton_equals_float64_reference_fp32(shape, masked, one_sided):
    B, H, M, N, d = shape
    t, mask = inputs(B, H, M, N, d, masked, one_sided)
    check(t, mask, d**-0.5, atol=1e-5, rtol=1e-5)


def test_spans_cover_every_token_once():
    """The span arithmetic the kernels rely on: spans of whole blocks, the last one reaching N, none empty."""
    for BH in (1, 3, 6, 600):
        for N in (1, 15, 16, 17, 1000, 65_536, 1_048_577):
            splits, span = ta._splits(BH, N, torch.device("cpu"))
            assert span % ta._SPAN_ALIGN == 0 and splits >= 1
            assert (splits - 1) * span < N <= splits * span


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_inputs(dtype, tol):
    if not CUDA and dtype == torch.bfloat16:
        pytest.skip("numpy, under Triton's interpreter, has no bfloat16: checked on CUDA")
    t, mask = inputs(2, 3, 20, 70, 16, True, dtype=dtype)
    check(t, mask, 16**-0.5, atol=tol, rtol=tol)


@pytest.mark.parametrize("B", [1, 3])
def test_packed_projection_layout(B):
    """r/v as the module makes them (heads split out of one projection): the op returns the projection's gradient
    whole, and the token update comes back token-major (merging heads is a view)."""
    H, M, N, d = 3, 6, 50, 8
    g = torch.Generator().manual_seed(2)
    rv_tok = torch.randn(B, N, 2 * H * d, generator=g).to(DEVICE).requires_grad_()
    r_lat, v_lat = (torch.randn(B, H, M, d, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    mask = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    mask[-1, 30:] = True
    r_tok, v_tok = split_heads(rv_tok, 2, H)
    lat, tok = ta.triton_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, d**-0.5, mask, packed_tok=rv_tok)
    assert tok.transpose(1, 2).is_contiguous()
    check([r_lat, v_lat, r_tok, v_tok], mask, d**-0.5, atol=1e-5, rtol=1e-5, packed=rv_tok)


def test_whole_model_equals_math():
    """A small BiXT on triton equals itself on math: logits and every parameter's gradient."""
    from conftest import tiny_config

    from bixt.models.bixt import BiXT

    torch.manual_seed(0)
    model = BiXT(tiny_config()).to(DEVICE)
    x = model.tokenizer.example_input(2, model.cfg.default_tokens, device=DEVICE)
    results = []
    for backend in ("math", "triton"):
        model.set_backend(backend)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_flop_handle_counts_one_similarity_matrix():
    """The triton op traces under the name flops.py gives it and counts like math and fused (3 products)."""
    assert TRITON_OP == f"prim::PythonOp.{ta.TritonBiDirectionalAttention.__name__}"
    M, N, dim, H = 4, 24, 16, 2
    counts = {}
    for backend in ("math", "fused", "triton"):
        torch.manual_seed(0)
        attn = BiDirectionalCrossAttention(dim, num_heads=H, backend=backend).to(DEVICE)
        x = (torch.randn(1, M, dim, device=DEVICE), torch.randn(1, N, dim, device=DEVICE))
        counts[backend] = count_macs(attn, x)
    assert counts["triton"].total == counts["math"].total == counts["fused"].total
    assert counts["triton"].by_operator.get(TRITON_OP.split("::", 1)[1]) == 3 * M * N * dim


def test_auto_picks_triton_on_cuda_only():
    assert auto_bidirectional(torch.device("cuda"), torch.bfloat16, 1, 1 << 20, training=True) == "triton"
    assert auto_bidirectional(torch.device("cuda"), torch.bfloat16, 1, 196, training=True) is None
    assert auto_bidirectional(torch.device("cuda"), torch.float32, 1, 1 << 16, training=False) == "triton"
    assert auto_bidirectional(torch.device("cpu"), torch.bfloat16, 1, 1 << 20, training=True) == "fused"
    assert auto_bidirectional(torch.device("cpu"), torch.float32, 1, 1 << 20, training=True) == "fused"


def test_refusals():
    t, _ = inputs(1, 2, 4, 10, 8, False)
    with pytest.raises(ValueError, match="no attention dropout"):
        bidirectional_attention(*t, dropout_p=(0.1, 0.1), backend="triton")
    with pytest.raises(ValueError, match="of one dtype"):
        ta.triton_bidirectional_attention(t[0], t[1], t[2].double(), t[3], 0.5)
    with pytest.raises(ValueError, match="padding_mask must be"):
        ta.triton_bidirectional_attention(*t, 0.5, torch.zeros(1, 9, dtype=torch.bool, device=DEVICE))
    rv = torch.randn(1, 10, 2 * 2 * 8, device=DEVICE)
    with pytest.raises(ValueError, match="packed_tok must be"):
        ta.triton_bidirectional_attention(t[0], t[1], *split_heads(rv, 2, 2), 0.5, packed_tok=rv.clone())


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from bixt.nn import attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA"):
        attention.resolve_backend("triton", torch.device("cpu"), torch.float32)
    assert attention.resolve_backend("triton", torch.device("cuda"), torch.float32) == "triton"
