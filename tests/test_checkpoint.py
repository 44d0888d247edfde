"""Checkpoints: both key layouts, every container format, clear errors, and no code ever unpickled."""
import argparse
import os
import pickle

import pytest
import torch
from conftest import tiny_config

from bixt import BiXT, create_model, load_checkpoint, save_weights
from bixt.io.checkpoint import read_state_dict
from bixt.models.official import bixt_to_official, build_from_official_args, official_to_bixt


def test_official_layout_round_trips_and_has_the_authors_keys():
    with torch.device("meta"):
        ours = create_model("bixt_ti_l64_p16").state_dict()
    official = bixt_to_official(ours)
    assert len(official) == 434
    for key in ["latents", "patch_embed.proj.weight", "fourier_pos_encode.pos",
                "fourier_pos_encode.token_projection.bias",
                "blocks.0.cross_attention_latents_token.norm1_pat.weight",
                "blocks.0.cross_attention_latents_token.attn.rv_patches.weight",
                "blocks.0.cross_attention_latents_token.attn.proj_pat.bias",
                "blocks.0.cross_attention_latents_token.mlp_pat.fc2.weight",
                "blocks.0.cross_attention_latents_token.norm2_pat.bias",
                "blocks.11.cross_attention_latents_token.attn.r_latents.weight",
                "blocks.11.cross_attention_latents_token.norm1_pat.weight",
                "blocks.11.self_attention_latents.attn.qkv.weight", "fc_norm.weight", "head.bias"]:
        assert key in official, key
    last = [k for k in official if k.startswith("blocks.11.")]
    assert not any(part in k for k in last for part in ("norm2_pat", "mlp_pat", "proj_pat", "rv_latents"))
    assert list(official_to_bixt(official)) == list(ours)


def _save_torch(obj, path):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("layout", ["ours", "official"])
@pytest.mark.parametrize("container", ["safetensors", "plain", "model", "state_dict", "ddp", "timm"])
def test_every_container_loads(tmp_path, layout, container):
    src = BiXT(tiny_config()).eval()
    state = src.state_dict() if layout == "ours" else bixt_to_official(src.state_dict())
    if container == "safetensors":
        path = save_weights(state, tmp_path / "w.safetensors")
    else:
        wrapped = {"plain": state, "model": {"model": state, "epoch": 3},
                   "state_dict": {"state_dict": state, "optimizer": {"lr": 0.1}},
                   "ddp": {f"module.{k}": v for k, v in state.items()},
                   # timm's train.py saves its argparse arguments beside the weights.
                   "timm": {"epoch": 299, "arch": "bixt", "state_dict": state, "args": argparse.Namespace(lr=1e-3),
                            "metric": 80.1}}[container]
        path = _save_torch(wrapped, tmp_path / "w.pth.tar")
    dst = load_checkpoint(BiXT(tiny_config()).eval(), path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / "pwned"  # fresh per test: no leftover file can make the check pass or fail
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": Exploit(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(ValueError, match="refused, not unpickled"):
        load_checkpoint(BiXT(tiny_config()), path)
    assert not os.path.exists(marker)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint|refused"):
        read_state_dict(bad)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_dict(bad_st)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="no state dict found"):
        read_state_dict({"epoch": 3, "args": "x"})


def test_mismatch_names_keys_and_the_right_model():
    with torch.device("meta"):
        p16 = bixt_to_official(create_model("bixt_ti_l64_p16").state_dict())
        target = create_model("bixt_ti_l64_p16s8")
    # Same weight shapes, different tokenizer stride: the stored 14x14 grid tells them apart.
    with pytest.raises(ValueError, match=r"shape mismatches \[tokenizer.pos_embed.pos.*it fits bixt_ti_l64_p16$"):
        load_checkpoint(target, p16)
    with torch.device("meta"):
        ten_classes = create_model("bixt_ti_l64_p16", num_classes=10).state_dict()
        with pytest.raises(ValueError, match="head.weight.*it fits bixt_ti_l64_p16 with num_classes=10"):
            load_checkpoint(create_model("bixt_ti_l64_p16"), ten_classes)
    state = BiXT(tiny_config()).state_dict()
    state.pop("layers.0.cross.mlp_tok.fc1.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \[layers.0.cross.mlp_tok.fc1.weight\]; "
                                         r"unexpected keys \[extra.weight\]; no registered BiXT"):
        load_checkpoint(BiXT(tiny_config()), state)


def test_stored_positional_grid_is_checked_or_dropped():
    state = BiXT(tiny_config()).state_dict()
    corrupt = dict(state, **{"tokenizer.pos_embed.pos": state["tokenizer.pos_embed.pos"] + 0.1})
    with pytest.raises(ValueError, match="positional grid differs"):
        load_checkpoint(BiXT(tiny_config()), corrupt)
    # The _ft384 variants recompute their grid: a 224-px checkpoint's buffer is dropped, as the authors do.
    dynamic = load_checkpoint(BiXT(tiny_config(pos_buffer=False)), state)
    assert "tokenizer.pos_embed.pos" not in dynamic.state_dict()
    # A checkpoint without the buffer fills it from the recomputation.
    without = {k: v for k, v in state.items() if k != "tokenizer.pos_embed.pos"}
    load_checkpoint(BiXT(tiny_config()), without)


def test_save_weights_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_weights(BiXT(tiny_config()), path)
    before = path.read_bytes()

    def crash(tensors, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_weights(BiXT(tiny_config()), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_official_args_are_validated():
    with pytest.raises(ValueError, match="unsupported BiXT arguments frobnicate"):
        build_from_official_args({"frobnicate": 1})
    with pytest.raises(ValueError, match="unsupported tokenizer 'ConvEmbed'"):
        build_from_official_args({"embed_layer": "ConvEmbed (3x3 convs)"})
    model = build_from_official_args({"img_size": 64, "depth": 2, "embed_layer": "PatchEmbedQuarterStride (...)",
                                      "posenc_type_pat": "fourier2d_embadd_proj_dyn", "init_values": 1e-5})
    assert model.cfg.stride == 4 and not model.cfg.pos_buffer and model.cfg.layerscale == 1e-5
