"""Baselines and ablations: published sizes, every modality through one forward contract, backends agree."""
import pytest
import torch
from bixt_baselines.perceiver import FourierConcatTokenizer, PerceiverConfig
from bixt_baselines.vit import LearnedPosEmbed2d, ViTConfig, resample_pos_embed
from conftest import assert_padding_changes_nothing
from typer.testing import CliRunner

from bixt import create_model
from bixt.models import BiXTConfig
from bixt.models.blocks import CrossBlock
from bixt.models.registry import count_params, families, list_models
from bixt.nn.attention import BiDirectionalCrossAttention, SequentialCrossAttention


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- published sizes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("vit_ti_p16", 5_717_416), ("vit_s_p16", 22_050_664)])
def test_deit_parameter_counts_are_exact(name, params):
    assert count_params(name) == params


def test_deit_ti_gmacs_count_the_attention_matmuls():
    """DeiT-Ti: 1.26 GMACs at 224 px with attention counted (the `math` backend shows fvcore every matmul)."""
    from fvcore.nn import FlopCountAnalysis

    model = create_model("vit_ti_p16").eval().set_backend("math")
    flops = FlopCountAnalysis(model, model.tokenizer.example_input(1))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    assert flops.total() / 1e9 == pytest.approx(1.26, abs=0.005)


def test_perceiver_imagenet_is_the_papers_size():
    """Published 44.9 M. Independently, from the paper's description: 261 input channels (RGB + 2 x (2 x 64 + 1)),
    one cross-attend with 261-channel q/k/v plus one shared by the 7 repeats, one 6-layer latent stack (1024
    channels, 8 heads) shared by all 8 repeats, MLPs of width 1024, mean-pool head."""
    c, d, m = 261, 1024, 512

    def linear(i, o):
        return i * o + o

    norm = 2 * d
    cross = norm + 2 * c + linear(d, c) + linear(c, 2 * c) + linear(c, d) + norm + linear(d, d) * 2
    latent = norm + linear(d, 3 * d) + linear(d, d) + norm + linear(d, d) * 2
    expected = 2 * cross + 6 * latent + m * d + norm + linear(d, 1000)
    assert count_params("perceiver_imagenet") == expected
    assert abs(expected - 44.9e6) / 44.9e6 < 0.05
    cfg = create_model("perceiver_imagenet", num_latents=4, dim=16, heads=2, img_size=8).cfg
    assert cfg.token_dim == 261 and cfg.depth == 48


def test_sequential_attention_has_eight_maps_where_bidirectional_has_six():
    seq, bi = SequentialCrossAttention(192), BiDirectionalCrossAttention(192)
    assert n_params(seq) == 296_448 and n_params(bi) == 222_336
    # q, k, v, o per direction (k and v fused): 8 d x d maps against R, V per side and two outputs: 6.
    maps = {m: sum(lin.out_features for lin in m.modules() if isinstance(lin, torch.nn.Linear)) // 192
            for m in (seq, bi)}
    assert maps[seq] == 8 and maps[bi] == 6


def test_ablation_totals_follow_from_the_attention_modules():
    base = count_params("bixt_ti_l64_p16")
    # 11 two-sided layers: bigger attention, plus the norm the tokens read the updated latents through.
    assert count_params("bixt_ti_sequential") == base + 11 * (296_448 - 222_336 + 2 * 192)
    # Iterative: every layer like the one-sided last one (no V_lat, no token output, MLP or MLP norm).
    one_sided = n_params(BiDirectionalCrossAttention(192, one_sided=True))
    token_side = 222_336 - one_sided + (192 * 768 + 768 + 768 * 192 + 192) + 2 * 192
    assert count_params("bixt_ti_iterative") == base - 11 * token_side


# ---- one forward contract, every family, every modality --------------------------------------------------------

TINY = {
    "vit_ti_p16": dict(dim=32, heads=2, depth=2),
    "perceiver_ti": dict(dim=32, heads=2, cross_heads=2, attn_dim=32, num_latents=8, num_blocks=3, self_per_block=1),
    "perceiver_imagenet": dict(dim=32, heads=2, num_latents=8, num_blocks=3, self_per_block=2, fourier_bands=4),
    "bixt_ti_sequential": dict(dim=32, heads=2, depth=3, num_latents=8),
    "bixt_ti_iterative": dict(dim=32, heads=2, depth=3, num_latents=8),
}
MODALITY = {
    "image": dict(modality="image", img_size=32),
    "points": dict(modality="points", in_chans=6, seq_len=40, fourier_bands=4, max_freq=8.0),
    "sequence": dict(modality="sequence", in_chans=0, vocab_size=50, seq_len=40),
}
NON_DEFAULT_LEN = {"image": 36, "points": 23, "sequence": 23}  # image: a 6 x 6 grid where the default is 2 x 2


def tiny(name, modality, **overrides):
    base = {**TINY[name], **MODALITY[modality], "num_classes": 5}
    if modality == "image" and name.startswith("perceiver"):
        base["max_freq"] = 4.0
    if modality == "image" and name == "perceiver_imagenet":
        base.update(img_size=4)  # pixels: 16 tokens by default
    return create_model(name, **{**base, **overrides})


@pytest.mark.parametrize("modality", sorted(MODALITY))
@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward_at_a_non_default_length(name, modality):
    model = tiny(name, modality)
    n = NON_DEFAULT_LEN[modality]
    assert n != model.tokenizer.default_seq_len
    x = model.tokenizer.example_input(2, n)
    # Zero-initialised heads would stop gradients into the body at step 0; use a random one.
    torch.nn.init.normal_(model.head.weight)
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", ["vit_ti_p16", "perceiver_ti", "bixt_ti_sequential", "bixt_ti_iterative"])
@pytest.mark.parametrize("modality", ["image", "points"])
def test_sdpa_agrees_with_math_to_1e5(name, modality):
    model = tiny(name, modality).eval()
    torch.nn.init.normal_(model.head.weight)
    x = model.tokenizer.example_input(3, 36 if modality == "image" else 30)
    mask = None
    if modality == "points":
        mask = torch.zeros(3, 30, dtype=torch.bool)
        mask[1, 20:] = True
    out = {}
    for backend in ("math", "sdpa"):
        with torch.no_grad():
            out[backend] = model.set_backend(backend)(x, padding_mask=mask)
    torch.testing.assert_close(out["sdpa"], out["math"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vit_ti_p16", "perceiver_ti", "bixt_ti_sequential", "bixt_ti_iterative"])
def test_padded_points_change_nothing(name):
    model = tiny(name, "points").eval()
    assert_padding_changes_nothing(model, model.tokenizer.example_input(2, 30), keep=18)


def test_dense_outputs_where_there_is_a_token_stream():
    vit = tiny("vit_ti_p16", "points", dense_classes=4)
    assert vit.forward_dense(torch.rand(2, 17, 6)).shape == (2, 17, 4)
    seq = tiny("bixt_ti_sequential", "points", dense_classes=4)
    assert seq.forward_dense(torch.rand(2, 17, 6)).shape == (2, 17, 4)
    io = tiny("perceiver_ti", "points", dense_classes=4)  # Perceiver IO: one query per token reads the latents
    assert io.forward_dense(torch.rand(2, 17, 6)).shape == (2, 17, 4)
    perceiver = tiny("perceiver_ti", "points")
    for call in (lambda: perceiver.forward_dense(torch.rand(2, 17, 6)),
                 lambda: perceiver.forward_features(torch.rand(2, 17, 6), return_tokens=True)):
        with pytest.raises(ValueError, match="Perceiver has no token stream"):
            call()


# ---- what each architecture means -------------------------------------------------------------------------------

def test_sequential_tokens_read_the_updated_latents():
    """Sequential: the tokens' update depends on the latents' MLP of the same layer; bi-directional: it cannot."""
    lat, tok = torch.randn(2, 8, 32), torch.randn(2, 20, 32)
    for pattern, depends in (("sequential", True), ("bidirectional", False)):
        block = CrossBlock(BiXTConfig(dim=32, heads=2, cross_attention=pattern), 0.0, one_sided=False).eval()
        _, tok_a = block(lat, tok, None)
        torch.nn.init.normal_(block.mlp_lat.fc2.weight)
        _, tok_b = block(lat, tok, None)
        assert (not torch.allclose(tok_a, tok_b)) == depends


def test_iterative_never_refines_the_tokens():
    model = tiny("bixt_ti_iterative", "points", dense_classes=3)
    assert all(layer.cross.one_sided for layer in model.layers)
    pts = torch.rand(2, 17, 6)
    _, tokens = model.forward_features(pts, return_tokens=True)
    torch.testing.assert_close(tokens, model.tokenizer(pts), atol=0, rtol=0)


def test_perceiver_shares_weights_after_the_first_cross_attend():
    model = tiny("perceiver_imagenet", "image")  # 3 cross-attends of 2 latent layers
    assert len(model.cross) == 2 and len(model.latent) == 2
    assert model.schedule() == [(0, [0, 1]), (1, [0, 1]), (1, [0, 1])]
    unshared = tiny("perceiver_imagenet", "image", share_cross=False, share_latent=False)
    assert len(unshared.cross) == 3 and len(unshared.latent) == 6
    assert unshared.schedule()[2] == (2, [4, 5])


def test_perceiver_image_tokens_are_pixels_with_concatenated_positions():
    tok = FourierConcatTokenizer(in_chans=3, patch_size=1, stride=1, img_size=8, fourier_bands=4, max_freq=8.0)
    x = torch.randn(2, 3, 8, 8)
    out = tok(x)
    assert out.shape == (2, 64, 3 + 2 * (2 * 4 + 1)) and tok.out_dim == out.shape[-1]
    torch.testing.assert_close(out[..., :3], x.flatten(2).transpose(1, 2))  # raw pixels, row-major
    torch.testing.assert_close(out[0, 9, 3:5], torch.tensor([-1 + 2 / 7, -1 + 2 / 7]))  # (y, x) of pixel (1, 1)
    patches = FourierConcatTokenizer(3, patch_size=4, stride=4, img_size=8, fourier_bands=4, max_freq=2.0)(x)
    torch.testing.assert_close(patches[0, 1, :48].reshape(3, 4, 4), x[0, :, :4, 4:])  # second patch of row 0


# ---- ViT positional embedding -------------------------------------------------------------------------------------

def test_vit_pos_embed_is_used_as_is_on_its_grid_and_resized_elsewhere():
    pos = LearnedPosEmbed2d(8, (4, 4))
    torch.nn.init.normal_(pos.weight)
    torch.testing.assert_close(pos(4, 4), pos.weight[0], atol=0, rtol=0)
    assert pos(6, 3).shape == (18, 8)
    # Bicubic resizing keeps a constant field constant and a field of the row alone independent of the column.
    const = torch.full((1, 16, 8), 0.7)
    torch.testing.assert_close(resample_pos_embed(const, (4, 4), (7, 5)), torch.full((1, 35, 8), 0.7))
    rows = torch.randn(1, 4, 1, 8).expand(1, 4, 4, 8).reshape(1, 16, 8)
    out = resample_pos_embed(rows, (4, 4), (9, 6)).reshape(9, 6, 8)
    torch.testing.assert_close(out, out[:, :1].expand(9, 6, 8))


def test_vit_ti_takes_16384_tokens():
    model = create_model("vit_ti_p16", depth=1)
    x = model.tokenizer.example_input(1, 16_384)
    assert x.shape == (1, 3, 2048, 2048)
    with torch.no_grad():
        assert model.tokenizer(x).shape == (1, 16_384, 192)


# ---- registry and errors -------------------------------------------------------------------------------------------

def test_every_family_is_in_the_one_registry():
    assert {"bixt", "bixt-ablation", "vit", "perceiver"} <= set(families())
    assert list_models(family="bixt-ablation") == ["bixt_cpu_iterative", "bixt_cpu_sequential",
                                                   "bixt_shapes_iterative", "bixt_shapes_sequential",
                                                   "bixt_ti_iterative", "bixt_ti_sequential"]
    assert {"vit_ti_p16", "vit_s_p16"} <= set(list_models(family="vit"))
    assert {"perceiver_ti", "perceiver_imagenet"} <= set(list_models(family="perceiver"))
    assert create_model("bixt_ti_sequential", depth=2).cfg.cross_attention == "sequential"


def test_models_command_shows_the_families():
    from bixt_cli.main import app

    result = CliRunner().invoke(app, ["models", "--family", "perceiver"])
    assert result.exit_code == 0, result.output
    assert "perceiver_imagenet" in result.output and "44,914,302" in result.output
    result = CliRunner().invoke(app, ["models", "--filter", "vit_ti_p16"])
    assert "vit" in result.output and "5,717,416" in result.output


@pytest.mark.parametrize("make,match", [
    (lambda: BiXTConfig(cross_attention="parallel"), "unknown cross_attention 'parallel'"),
    (lambda: ViTConfig(dim=192, heads=5), "heads=5"),
    (lambda: PerceiverConfig(attn_dim=100, cross_heads=3), "cross_heads=3"),
    (lambda: create_model("perceiver_ti", stride=5), "stride 5 does not fit"),
    (lambda: create_model("vit_ti_p16", latents=3), "has no option latents"),
    (lambda: tiny("perceiver_ti", "image")(torch.randn(1, 32, 32)), r"\(B, 3, H, W\)"),
    (lambda: tiny("perceiver_ti", "image")(torch.randn(1, 1, 32, 32)), "in_chans=1"),
    (lambda: tiny("vit_ti_p16", "points")(torch.rand(2, 9, 6), padding_mask=torch.zeros(2, 8, dtype=torch.bool)),
     "padding_mask must be"),
    (lambda: SequentialCrossAttention(32, num_heads=2, one_sided=True).read_latents(torch.randn(1, 3, 32),
                                                                                     torch.randn(1, 2, 32)),
     "one-sided"),
])
def test_invalid_input_raises_value_error_naming_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def timm_vit_reference(sd: dict, x: torch.Tensor, depth: int, heads: int, patch: int) -> torch.Tensor:
    """timm's VisionTransformer forward (class token, pre-norm blocks, LayerNorm eps 1e-6, exact GELU, head on the
    normed class token) written out with torch.nn.functional on a timm-layout state dict: an independent path."""
    import torch.nn.functional as F

    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1) + sd["pos_embed"]
    B, N, D = t.shape

    def ln(v, name):
        return F.layer_norm(v, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    def lin(v, name):
        return F.linear(v, sd[name + ".weight"], sd[name + ".bias"])

    for i in range(depth):
        p = f"blocks.{i}."
        q, k, v = lin(ln(t, p + "norm1"), p + "attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1) @ v
        t = t + lin(a.transpose(1, 2).reshape(B, N, D), p + "attn.proj")
        t = t + lin(F.gelu(lin(ln(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    return lin(ln(t, "norm")[:, 0], "head")


def test_timm_vit_weights_load_and_compute_what_timm_computes(tmp_path):
    """A timm-layout checkpoint (random weights, DeiT's {'model': ...} wrapper) through `bixt eval`'s loader gives
    the logits of timm's forward written out independently; distilled DeiT is refused with a clear error."""
    from bixt.io.checkpoint import load_checkpoint, save_weights

    depth, heads, D, patch, img, classes = 2, 2, 32, 8, 32, 7
    g = torch.Generator().manual_seed(0)
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + (img // patch) ** 2, D),
              "patch_embed.proj.weight": (D, 3, patch, patch), "patch_embed.proj.bias": (D,),
              "norm.weight": (D,), "norm.bias": (D,), "head.weight": (classes, D), "head.bias": (classes,)}
    for i in range(depth):
        for name, shape in {"norm1": (D,), "norm2": (D,), "attn.qkv": (3 * D, D), "attn.proj": (D, D),
                            "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
    sd = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    path = tmp_path / "deit.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    model = create_model("vit_ti_p16", img_size=img, patch_size=patch, stride=patch, dim=D, depth=depth,
                         heads=heads, num_classes=classes).eval()
    load_checkpoint(model, path)
    x = torch.randn(2, 3, img, img, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_vit_reference(sd, x, depth, heads, patch), atol=1e-5, rtol=1e-5)
    save_weights({**sd, "dist_token": sd["cls_token"].clone()}, tmp_path / "distilled.safetensors")
    with pytest.raises(ValueError, match="dist_token: only the plain class-token ViT"):
        load_checkpoint(model, tmp_path / "distilled.safetensors")
