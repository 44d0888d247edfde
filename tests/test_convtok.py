"""The convolutional-tokenizer family (the authors' `BiXTConvTok`): published sizes and MACs, parity with their code
through the registered configs, their checkpoint layout, dense use of the d13 models, clear errors."""
import json

import pytest
import torch
from conftest import FIXTURES, fixture_names

from bixt import BiXT, BiXTConfig, create_model, load_checkpoint
from bixt.measure.flops import analytic_macs, count_macs
from bixt.models.official import bixt_to_official, checkpoint_filter_fn, config_from_official_args
from bixt.models.registry import count_params
from bixt.nn.sharding import TokenShard
from bixt.nn.tokenizers import ConvImageTokenizer

# BIXT-FACTS.md section 2 (the authors' code, 224 px, fvcore at batch 1): params, GMACs, tokens.
PUBLISHED = {
    "bixt_ti_cnv_l64_p16": (15_192_640, 1.7574, 196),
    "bixt_ti_cnv_l64_d13_p16": (16_453_120, 1.9005, 196),
    "bixt_ti_cnv_l64_d13_p8": (16_443_352, 5.2727, 784),
    "bixt_ti_cnv_l64_d13_p4": (16_403_080, 18.3525, 3136),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts_grids_and_closed_form_macs(name):
    params, gmacs, tokens = PUBLISHED[name]
    assert count_params(name) == params
    with torch.device("meta"):
        model = create_model(name)
    assert isinstance(model.tokenizer, ConvImageTokenizer) and model.cfg.default_tokens == tokens
    assert analytic_macs("bixt", model.cfg, tokens, "math").total / 1e9 == pytest.approx(gmacs, abs=1e-4)


def test_fvcore_gmacs_match_published_and_the_closed_form():
    """fvcore on `math` (plain matmuls, BatchNorm counted at inference) sees what it saw on the authors' model."""
    model = create_model("bixt_ti_cnv_l64_p16").set_backend("math")
    traced = count_macs(model, model.tokenizer.example_input(1))
    assert not traced.unsupported
    assert traced.total / 1e9 == pytest.approx(1.7574, rel=0.01, abs=1e-4)
    assert traced.total == analytic_macs("bixt", model.cfg, 196, "math").total


def _fixture():
    return (torch.load(FIXTURES / "tiny_cnv_p16.pt", weights_only=True),
            json.loads((FIXTURES / "tiny_cnv_p16.json").read_text()))


def test_registered_config_is_the_authors_model():
    """The fixture's model is bixt_ti_cnv_l64_p16 at a small size: the registered config, resized, reproduces the
    authors' outputs (test_model.py's parity test covers the fixture through the argument bridge)."""
    assert "tiny_cnv_p16" in fixture_names()
    fixture, args = _fixture()
    small = dict(img_size=args["img_size"], num_classes=args["num_classes"], num_latents=args["num_latents"],
                 dim=args["embed_dim_lat"], depth=args["depth"], heads=args["sa_num_heads"])
    model = create_model("bixt_ti_cnv_l64_p16", **small)
    assert model.cfg == config_from_official_args(args)
    load_checkpoint(model, fixture["state_dict"]).eval()
    with torch.no_grad():
        latents, tokens = model.forward_features(fixture["input"], return_tokens=True)
        logits = model.forward_head(latents)
    torch.testing.assert_close(logits, fixture["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(latents, fixture["latents"], atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, fixture["tokens_before_last_layer"], atol=1e-5, rtol=0)


def test_authors_layout_round_trips_and_names_the_fitting_model():
    fixture, args = _fixture()
    model = BiXT(config_from_official_args(args))
    # Their stem keys (patch_embed.proj.{2i}.{0,1}.*, BatchNorm buffers included) are exactly ours, renamed.
    assert sorted(bixt_to_official(model.state_dict())) == sorted(fixture["state_dict"])
    assert sorted(checkpoint_filter_fn(dict(fixture["state_dict"]), model)) == sorted(model.state_dict())
    with torch.device("meta"):
        p8 = bixt_to_official(create_model("bixt_ti_cnv_l64_d13_p8").state_dict())
        stem = [k for k in p8 if k.startswith("patch_embed.")]
        assert stem[0] == "patch_embed.proj.0.0.weight" and "patch_embed.proj.4.1.running_var" in stem
        with pytest.raises(ValueError, match="it fits bixt_ti_cnv_l64_d13_p8$"):
            load_checkpoint(create_model("bixt_ti_cnv_l64_d13_p16"), p8)


def test_d13_is_a_dense_backbone_without_its_last_layer():
    """The authors' dense use: drop the d13 classifier's last (one-sided) layer; the tokens out of the layer before
    are the dense features. Here: the classifier's weights (the authors' layout) load strictly into a
    one-layer-shallower dense model; two layers shallower is refused."""
    small = dict(img_size=64, depth=3, dim=64, heads=2, num_latents=8)
    classifier = create_model("bixt_ti_cnv_l64_d13_p8", **small).eval()
    dense = create_model("bixt_ti_cnv_l64_d13_p8", **{**small, "depth": 2}, num_classes=0, dense_classes=5)
    assert all(not layer.cross.one_sided for layer in dense.layers)
    load_checkpoint(dense, bixt_to_official(classifier.state_dict())).eval()  # strict: only the last layer goes
    torch.nn.init.normal_(dense.dense_head.weight)  # zero-initialised: give the check something to see
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, tokens = classifier.forward_features(x, return_tokens=True)
        torch.testing.assert_close(dense.forward_features(x, return_tokens=True)[1], tokens, atol=0, rtol=0)
        logits = dense(x)
    assert logits.shape == (2, 64, 5)
    torch.testing.assert_close(logits, dense.dense_head(dense.dense_norm(tokens)), atol=0, rtol=0)
    shallower = create_model("bixt_ti_cnv_l64_d13_p8", **{**small, "depth": 1}, num_classes=0, dense_classes=5)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_checkpoint(shallower, classifier.state_dict())


def test_batchnorm_trains_and_every_stage_gets_a_gradient():
    model = create_model("bixt_ti_cnv_l64_d13_p4", img_size=16, depth=2, dim=32, heads=2, num_latents=4)
    torch.nn.init.normal_(model.head.weight)
    model(torch.randn(3, 3, 16, 16)).square().sum().backward()
    stem = dict(model.tokenizer.named_parameters())
    assert len(stem) == 8 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.values())
    assert int(model.tokenizer.proj[0][1].num_batches_tracked) == 1


@pytest.mark.parametrize("make,match", [
    (lambda: BiXTConfig(tokenizer="conv", patch_size=8), "set stride=8"),
    (lambda: BiXTConfig(tokenizer="conv", patch_size=12, stride=12), "power-of-two patch size"),
    (lambda: BiXTConfig(tokenizer="conv", dim=36, heads=6), "dim 36 is not divisible by 8"),
    (lambda: BiXTConfig(tokenizer="conv", modality="points"), "image tokenizer"),
    (lambda: BiXTConfig(tokenizer="pixels"), "unknown tokenizer 'pixels'"),
    (lambda: BiXT(BiXTConfig(tokenizer="conv", img_size=232)), "232 is not divisible by the patch size 16"),
    (lambda: create_model("bixt_ti_cnv_l64_p16", img_size=32)(torch.randn(1, 3, 40, 40)), "divisible by the stride"),
    (lambda: create_model("bixt_ti_cnv_l64_p16", img_size=32).shard_tokens(TokenShard(0, 2)), "token_span"),
])
def test_invalid_settings_raise_value_error_naming_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()
