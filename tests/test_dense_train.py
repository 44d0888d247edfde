"""Dense prediction end to end: per-token logits laid out as the labels (images upsampled to the pixels), the loss
and metrics over labelled tokens only, training and `bixt eval` on the generated part-segmentation and scene data,
and the Perceiver IO decoder (its cost in the closed form, exactly as fvcore counts it)."""
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bixt.data import Data, TensorSplit, build_data
from bixt.measure.flops import analytic_macs, count_macs
from bixt.models.registry import create_model, get_entry
from bixt.study import accuracy as acc
from bixt.train import train
from bixt.train.distributed import Dist
from bixt.train.engine import dense_logits, evaluate_dense
from bixt.train.metrics import SegmentationMeter
from bixt.train.rundir import read_metrics
from bixt_cli.main import app

runner = CliRunner()
SMALL = {"dim": 32, "heads": 2, "depth": 2}


def test_point_logits_put_the_classes_second():
    logits = torch.randn(2, 5, 3)
    assert torch.equal(dense_logits(logits, torch.randn(2, 5, 3)), logits.transpose(1, 2))


def test_image_logits_are_the_token_grid_upsampled_bilinearly():
    grid = torch.randn(2, 4, 3, 3)  # (B, K, h, w)
    tokens = grid.flatten(2).transpose(1, 2)  # row-major, as every tokenizer flattens its grid
    x = torch.randn(2, 1, 12, 12)
    out = dense_logits(tokens, x)
    assert out.shape == (2, 4, 12, 12)
    assert torch.allclose(out, F.interpolate(grid, size=(12, 12), mode="bilinear", align_corners=False))
    # at a pixel block's middle the value is the token's own (bilinear between cell centres)
    constant = dense_logits(torch.ones(1, 9, 2) * 3.0, torch.randn(1, 1, 12, 12))
    assert torch.allclose(constant, torch.full_like(constant, 3.0))
    with pytest.raises(ValueError, match="no grid over the 12x12 image"):
        dense_logits(torch.randn(1, 10, 2), x)


def _void_data():
    torch.manual_seed(0)
    x, y = torch.randn(6, 8, 3), torch.randint(0, 4, (6, 8))
    y[0] = -100  # a sample without any label
    y[1, :5] = -100
    split = TensorSplit(x, y)
    return Data("void", "points", 4, 3, split, split, list("abcd"), task="segment")


def test_evaluate_dense_counts_labelled_tokens_only_against_a_second_computation():
    data = _void_data()
    model = create_model("bixt_shapes", **SMALL, num_classes=0, dense_classes=4, seq_len=8).eval()
    result = evaluate_dense(model, data, 4, Dist())
    with torch.no_grad():
        logits = model(data.test.x).transpose(1, 2)
    y = data.test.y
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y, ignore_index=-100).item(), rel=1e-5)
    valid = y != -100
    assert result["top1"] == pytest.approx((logits.argmax(1) == y)[valid].float().mean().item())
    meter = SegmentationMeter(4)
    meter.update(logits.argmax(1), y)
    assert result["miou"] == pytest.approx(meter.compute()["miou"])
    assert result["top5"] is None and result["samples"] == 6


@pytest.mark.parametrize("spec, model", [("partshapes:train=64,test=24,points=64", "bixt_shapes"),
                                         ("partshapes:train=64,test=24,points=64", "perceiver_shapes"),
                                         ("segscenes:train=64,test=24,size=16", "bixt_digits"),
                                         ("segscenes:train=64,test=24,size=16", "vit_cpu")])
def test_dense_training_records_miou_in_its_metrics(tmp_path, spec, model):
    args = {**SMALL, "num_latents": 8} if "vit" not in model else dict(SMALL)
    if "segscenes" in spec:
        args.update(img_size=16, patch_size=4, stride=4)
    if "perceiver" in model:
        args = {"dim": 32, "heads": 2, "num_latents": 8, "cross_heads": 2, "attn_dim": 32, "num_blocks": 2}
    result = train({"data": spec, "model": model, "model_args": args, "epochs": 2, "batch_size": 16,
                    "out": str(tmp_path / "run")})
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and all(0 <= r["test_miou"] <= 1 for r in rows)
    assert (rows[-1]["test_instance_miou"] is not None) == spec.startswith("partshapes")
    assert rows[-1]["test_top5"] is None
    assert result.best_acc == pytest.approx(max(r["test_miou"] for r in rows), abs=1e-8)  # best: by mIoU
    assert (tmp_path / "run" / "curves.png").is_file()


@pytest.mark.slow
def test_bixt_eval_reports_the_dense_metrics_of_the_run(tmp_path):
    spec = "partshapes:train=64,test=24,points=64"
    train({"data": spec, "model": "bixt_shapes", "model_args": {**SMALL, "num_latents": 8}, "epochs": 1,
           "batch_size": 16, "out": str(tmp_path / "run")})
    rows = read_metrics(tmp_path / "run")
    result = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["miou"] == pytest.approx(rows[-1]["test_miou"], abs=1e-6)
    assert report["instance_miou"] == pytest.approx(rows[-1]["test_instance_miou"], abs=1e-6)
    table = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "run")])
    assert "mIoU" in table.output and "instance mIoU" in table.output


def test_dense_tasks_refuse_token_sharding():
    from bixt.train.config import TrainConfig
    from bixt.train.loop import _fit

    d = Dist(world=2, shard=2)  # the two processes of one sample, as torchrun would give them
    with pytest.raises(ValueError, match="dense task, which does not run token-sharded"):
        _fit(TrainConfig(data="partshapes:train=8,test=4,points=16", model="bixt_shapes", shard_tokens=2,
                         batch_size=2), d)


@pytest.mark.parametrize("name, n, x", [("perceiver_cpu", 49, torch.randn(1, 1, 28, 28)),
                                         ("perceiver_shapes", 64, torch.randn(1, 64, 3))])
def test_the_perceiver_io_decoder_costs_what_the_closed_form_says(name, n, x):
    entry = get_entry(name)
    dense = entry.config.replace(name, num_classes=0, dense_classes=7, seq_len=64)
    model = entry.build(dense).eval()
    assert model(x).shape == (1, n, 7)
    traced = count_macs(model, x)
    assert traced.total == analytic_macs("perceiver", dense, n, "math").total
    plain = entry.build(entry.config.replace(name, seq_len=64))
    # the decoder is what dense outputs cost beyond the classifier's pooled head, and it grows with the tokens
    assert traced.total > count_macs(plain, x).total


def test_the_decoder_queries_depend_on_position_not_on_content():
    model = create_model("perceiver_cpu", num_classes=0, dense_classes=3).eval()
    x = torch.randn(2, 1, 28, 28)
    q = model.query_features(x, model.tokenizer(x))
    assert q.shape == (2, 49, model.query_dim) and torch.equal(q[0], q[1])


def test_a_dense_study_summarizes_miou(tmp_path):
    def fake(cfg, on_epoch):
        m = 0.3 + 0.01 * cfg.seed
        return {"status": "ok", "message": "", "test_acc": 0.8, "test_top5": None, "test_loss": 1.0,
                "test_miou": m, "test_instance_miou": m + 0.1, "train_acc": 0.8, "train_samples_per_s": 10.0,
                "train_s": 1.0, "wall_s": 2.0, "peak_mem_mib": 100.0, "mem_kind": "process RSS"}

    study = acc.Study("partshapes:train=8,test=4,points=16", ("bixt_shapes", "vit_shapes"), seeds=(0, 1),
                      recipe={"epochs": 1})
    rows = acc.run_study(study, tmp_path / "s", runner=fake)
    table = acc.summarize(rows)
    assert [r["miou_mean"] for r in table] == pytest.approx([0.305, 0.305])
    assert table[0]["instance_miou_std"] == pytest.approx(torch.tensor([0.4, 0.41]).std().item())
    assert (tmp_path / "s" / "accuracy_vs_gmacs.png").is_file()
    assert acc.resolve_models(None, ["vit", "perceiver"], "points") == ("bixt_shapes", "vit_shapes",
                                                                          "perceiver_shapes")


def test_the_generated_dense_sets_fit_their_default_models():
    for spec in ("partshapes:train=8,test=4", "segscenes:train=8,test=4"):
        from bixt.data import DEFAULT_MODELS, parse_spec

        name, args = DEFAULT_MODELS[parse_spec(spec).kind]
        cfg = get_entry(name).config.replace(name, **args)
        data = build_data(spec, img_size=cfg.img_size if cfg.modality == "image" else None,
                          points=cfg.seq_len if cfg.modality == "points" else None)
        model = create_model(name, **{**args, **data.input_overrides}).eval()
        x, y = data.test.__getitems__([0, 1])
        assert dense_logits(model(x), x).shape[2:] == y.shape[1:]


def test_a_data_kind_defaults_its_recipe_under_the_options_given():
    from bixt.train import resolve_config

    assert resolve_config({"data": "partshapes"}).epochs == 10
    assert resolve_config({"data": "segscenes"}).epochs == 15
    assert resolve_config({"data": "partshapes", "epochs": 3}).epochs == 3
    assert resolve_config({"data": "digits"}).epochs == 40
    study = acc.Study("partshapes", ("bixt_shapes",), seeds=(0,))
    assert study.config("bixt_shapes", {}, 0).epochs == 10
