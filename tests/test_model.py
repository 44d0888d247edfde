"""The model: parity with the authors' code, published sizes, every modality, clear errors."""
import json

import pytest
import torch
from conftest import FIXTURES, assert_padding_changes_nothing, fixture_names, tiny_config

import bixt
from bixt import BiXT, BiXTConfig, create_model, load_checkpoint
from bixt.models.official import build_from_official_args
from bixt.models.registry import count_params


@pytest.mark.parametrize("name", fixture_names())
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_official_fixture_parity(name, backend):
    fixture = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    args = json.loads((FIXTURES / f"{name}.json").read_text())
    model = build_from_official_args(args)
    load_checkpoint(model, fixture["state_dict"])
    model.eval().set_backend(backend)
    with torch.no_grad():
        latents, tokens = model.forward_features(fixture["input"], return_tokens=True)
        logits = model(fixture["input"])
    torch.testing.assert_close(logits, fixture["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(latents, fixture["latents"], atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, fixture["tokens_before_last_layer"], atol=1e-5, rtol=0)


# BIXT-FACTS.md section 2, measured by running the authors' code.
PUBLISHED_PARAMS = {
    "bixt_ti_l64_p16": 15_121_192, "bixt_ti_l64_p16s8": 15_121_192, "bixt_ti_l64_p16s4": 15_121_192,
    "bixt_ti_l64_p16_ft384": 15_121_192, "bixt_ti_l64_p16s8_ft384": 15_121_192,
    "bixt_ti_l64_p16s4_ft384": 15_121_192,
    "bixt_ti_l32_p16": 15_115_048, "bixt_ti_l32_p16s8": 15_115_048,
    "bixt_ti_l128_p16": 15_133_480, "bixt_ti_l128_p16s8": 15_133_480,
    "bixt_ti_l64_d13_p16": 16_381_672, "bixt_ti_l64_d13_p16s8": 16_381_672, "bixt_ti_l64_d13_p16s4": 16_381_672,
    "bixt_ed256_l64_p16": 26_682_088, "bixt_ed256_l64_p16s8": 26_682_088, "bixt_ed256_l64_p16s8_ft384": 26_682_088,
    "bixt_ed256LS_l64_p16s8": 26_700_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
    assert count_params(name) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name,gmacs", [("bixt_ti_l64_p16", 1.6795), ("bixt_ti_l32_p16", 1.2973)])
def test_fvcore_gmacs_match_published(name, gmacs):
    """fvcore on the `math` backend (plain matmuls) sees every MAC, as on the authors' model."""
    from fvcore.nn import FlopCountAnalysis

    model = create_model(name).eval().set_backend("math")
    flops = FlopCountAnalysis(model, model.tokenizer.example_input(1))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    assert flops.total() / 1e9 == pytest.approx(gmacs, abs=1e-4)


def test_stride_tokenizers_give_published_grids():
    for name, tokens in [("bixt_ti_l64_p16", 196), ("bixt_ti_l64_p16s8", 784), ("bixt_ti_l64_p16s4", 3136),
                         ("bixt_ti_l64_p16s4_ft384", 9216)]:
        tok = create_model(name).tokenizer
        assert tok(tok.example_input(1)).shape == (1, tokens, 192)


def test_shapes_and_heads_image():
    model = BiXT(tiny_config(stride=8)).eval()
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 5)
    lat, tok = model.forward_features(x, return_tokens=True)
    assert lat.shape == (3, 8, 32) and tok.shape == (3, 16, 32)
    assert model.forward_head(lat, pre_logits=True).shape == (3, 32)


def test_any_image_size_and_the_stored_grid_is_exact():
    """One model runs at its own grid (stored buffer) and at 16,384 tokens (grid computed on the fly)."""
    model = BiXT(tiny_config(stride=4)).eval()
    assert model.tokenizer.pos_embed.pos.shape == (64, 8, 8)
    with torch.no_grad():
        big = model.tokenizer(torch.randn(1, 3, 512, 512))
        assert big.shape == (1, 128 * 128, 32)
        assert model(torch.randn(1, 3, 512, 512)).shape == (1, 5)
        dynamic = BiXT(tiny_config(stride=4, pos_buffer=False)).eval()
        dynamic.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("pos_embed.pos")})
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x), dynamic(x), atol=0, rtol=0)


def test_points_with_padding_mask():
    model = BiXT(tiny_config(modality="points", in_chans=6, seq_len=50)).eval()
    pts = model.tokenizer.example_input(2, 50)
    assert pts.shape == (2, 50, 6)
    assert_padding_changes_nothing(model, pts, keep=30)


def test_sequences_ids_and_features():
    ids_model = BiXT(tiny_config(modality="sequence", in_chans=0, vocab_size=20, seq_len=40))
    ids = ids_model.tokenizer.example_input(2, 40)
    assert ids.dtype == torch.long and ids_model(ids).shape == (2, 5)
    feat_model = BiXT(tiny_config(modality="sequence", in_chans=7))
    assert feat_model(torch.randn(2, 33, 7)).shape == (2, 5)


def test_dense_head_keeps_the_last_layer_two_sided():
    model = BiXT(tiny_config(modality="points", dense_classes=4))
    assert not model.layers[-1].cross.one_sided
    pts = torch.rand(2, 20, 3)
    assert model.forward_dense(pts).shape == (2, 20, 4)
    classifier = BiXT(tiny_config())
    assert classifier.layers[-1].cross.one_sided
    with pytest.raises(ValueError, match="dense_classes"):
        classifier.forward_dense(torch.randn(1, 3, 32, 32))
    dense_only = BiXT(tiny_config(modality="points", num_classes=0, dense_classes=3))
    assert dense_only(pts).shape == (2, 20, 3)


@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(modality="points", dense_classes=3,
                                                             layerscale=1e-5)])
def test_every_parameter_gets_a_gradient(cfg):
    model = BiXT(cfg)
    x = model.tokenizer.example_input(2, 16)
    # Zero-initialised heads would stop gradients into the body at step 0; use random ones.
    for head in ("head", "dense_head"):
        if hasattr(model, head):
            torch.nn.init.normal_(getattr(model, head).weight)
    loss = model(x).square().sum() + (model.forward_dense(x).square().sum() if cfg.dense_classes else 0)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_d13_tokens_are_the_dense_features():
    model = create_model("bixt_ti_l64_d13_p16", depth=3, img_size=64)
    _, tok = model.forward_features(torch.randn(1, 3, 64, 64), return_tokens=True)
    assert tok.shape == (1, 16, 192)


def test_registry_and_overrides():
    names = bixt.list_models()
    assert set(PUBLISHED_PARAMS) <= set(names)
    assert bixt.list_models("bixt_ti_l32_*") == ["bixt_ti_l32_p16", "bixt_ti_l32_p16s8"]
    model = create_model("bixt_ti_l64_p16", num_classes=10, depth=2)
    assert model.head.out_features == 10 and len(model.layers) == 2


@pytest.mark.parametrize("make,match", [
    (lambda: BiXTConfig(dim=192, heads=5), "not divisible by heads=5"),
    (lambda: BiXTConfig(attn_dim=100, cross_heads=3), "not divisible by cross_heads=3"),
    (lambda: BiXTConfig(modality="audio"), "unknown modality"),
    (lambda: BiXT(BiXTConfig(img_size=230)), "not divisible by the stride"),
    (lambda: create_model("bixt_ti_l64_p17"), "did you mean bixt_ti_l64_p16"),
    (lambda: create_model("bixt_ti_l64_p16", heads_count=3), "has no option heads_count"),
    (lambda: BiXT(tiny_config())(torch.randn(3, 32, 32)), r"\(B, 3, H, W\)"),
    (lambda: BiXT(tiny_config())(torch.randn(1, 3, 36, 36)), "36x36 is not divisible by the stride 16"),
    (lambda: BiXT(tiny_config())(torch.randn(1, 1, 32, 32)), "in_chans=1"),
    (lambda: BiXT(tiny_config(modality="points"))(torch.randn(2, 10)), r"\(B, N, 3\)"),
    (lambda: BiXT(tiny_config(modality="sequence", in_chans=0, vocab_size=9))(torch.randn(2, 10)), "integer"),
    (lambda: BiXT(tiny_config()).tokenizer.example_input(1, 200), "use 196 or 225"),
])
def test_invalid_input_raises_value_error_naming_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_inference_chunks_per_token_branches_without_changing_results():
    """Without autograd, token MLPs run in place over cache-sized chunks (bixt.nn.layers.TOKEN_CHUNK)."""
    from bixt.nn.layers import TOKEN_CHUNK

    # One backend for both runs: `auto` switches to fused at fewer tokens when autograd records.
    model = BiXT(tiny_config(modality="points", seq_len=8)).eval().set_backend("sdpa")
    pts = torch.rand(2, 2 * TOKEN_CHUNK + 37, 3)
    before = pts.clone()
    with_grad_lat, with_grad_tok = model.forward_features(pts, return_tokens=True)
    with torch.inference_mode():
        lat, tok = model.forward_features(pts, return_tokens=True)
    torch.testing.assert_close(lat, with_grad_lat, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tok, with_grad_tok, atol=1e-6, rtol=1e-6)
    assert torch.equal(pts, before)


@pytest.mark.parametrize("device,calls", [("cpu", 3), ("meta", 1)])
def test_token_chunks_only_on_cpu(device, calls):
    """Chunking is a CPU cache optimisation; elsewhere (a GPU; meta stands in for it here) every chunk would be a
    handful of kernel launches, so the branch runs once over all tokens."""
    from bixt.nn.layers import TOKEN_CHUNK, add_per_token

    seen = []
    x = torch.zeros(1, 2 * TOKEN_CHUNK + 5, 4, device=device)
    with torch.no_grad():
        add_per_token(x, lambda part: seen.append(part.shape[1]) or part, training=False)
    assert len(seen) == calls and sum(seen) == x.shape[1]


def test_token_chunks_span_the_samples_of_a_batch():
    """A batch of short samples is chunked as one run of tokens: 3 x 500 tokens are two chunks, not three."""
    from bixt.nn.layers import TOKEN_CHUNK, add_per_token

    x = torch.randn(3, 500, 4)
    expected = x + (2 * x + 1)
    seen = []
    with torch.no_grad():
        out = add_per_token(x, lambda part: seen.append(tuple(part.shape)) or 2 * part + 1, training=False)
    assert seen == [(1, TOKEN_CHUNK, 4), (1, 1500 - TOKEN_CHUNK, 4)]
    assert out is x and torch.equal(out, expected)


def test_add_per_token_first_sums_the_projected_update_chunk_by_chunk_into_a_new_tensor():
    """`first=(y, f)`: (x + f(y)) + branch(x + f(y)), as the plain sums give it, chunk by chunk in CPU inference,
    into a new tensor (x is the caller's residual stream, y a non-contiguous view as attention leaves it)."""
    from bixt.nn.layers import TOKEN_CHUNK, add_per_token

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 700, 8, generator=g, dtype=torch.float64)
    y = torch.randn(3, 8, 700, generator=g, dtype=torch.float64).transpose(1, 2)
    w, v = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    f, branch = (lambda t: t @ w), (lambda t: torch.tanh(t @ v))
    t = x + f(y)
    expected = t + branch(t)
    before, seen = x.clone(), []
    with torch.no_grad():
        out = add_per_token(x, lambda p: seen.append(p.shape[1]) or branch(p), training=False, first=(y, f))
    assert seen == [TOKEN_CHUNK, TOKEN_CHUNK, 2100 - 2 * TOKEN_CHUNK]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out is not x and torch.equal(x, before) and out.is_contiguous()
    grad = add_per_token(x.requires_grad_(), branch, training=True, first=(y, f))  # the autograd path: plain sums
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
