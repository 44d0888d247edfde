"""The training comparison (`bixt compare --data`): the matched models, the fixed subsets, the grid of runs and its
bookkeeping (fake runners), the summary's statistics, and one real quick study end to end."""
import csv
import json
import statistics

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from bixt.data import build_data, take
from bixt.models.registry import get_entry
from bixt.study import accuracy as acc
from bixt.train import TrainConfig, train
from bixt_cli.main import app
from bixt_cli.study import parse_vary

runner = CliRunner()
MATCHED = ("bixt_cpu", "bixt_cpu_sequential", "bixt_cpu_iterative", "perceiver_cpu", "vit_cpu")


def test_the_matched_models_differ_only_in_the_attention_pattern():
    cfgs = {name: get_entry(name).config for name in MATCHED}
    for field in ("img_size", "in_chans", "patch_size", "stride", "dim", "heads", "mlp_ratio", "num_classes"):
        assert len({getattr(c, field) for c in cfgs.values()}) == 1, field
    assert len({c.depth for c in cfgs.values()}) == 1  # the Perceiver's: 4 cross-attends x 1 latent layer
    assert len({c.num_latents for n, c in cfgs.items() if n != "vit_cpu"}) == 1
    assert [cfgs[n].cross_attention for n in MATCHED[:4]] == ["bidirectional", "sequential", "iterative",
                                                              "iterative"]
    assert {c.default_tokens for c in cfgs.values()} == {49}
    assert cfgs["perceiver_cpu"].share_cross and not cfgs["perceiver_cpu"].share_latent


@pytest.mark.parametrize("stride, patch, tokens", [(7, 7, 16), (4, 8, 49), (2, 4, 196)])
def test_the_token_axis_of_the_reference_study(stride, patch, tokens):
    """The README's settings give these token counts on 28 px images, for every matched model."""
    x = torch.randn(2, 1, 28, 28)
    for name in MATCHED:
        cfg = get_entry(name).config.replace(name, stride=stride, patch_size=patch)
        assert get_entry(name).build(cfg).tokenizer(x).shape[1] == tokens == cfg.default_tokens


def test_parse_vary_zips_the_keys():
    assert parse_vary(None) == ({},)
    assert parse_vary(["stride=7,4,2", "patch_size=7, 8, 4"]) == (
        {"stride": 7, "patch_size": 7}, {"stride": 4, "patch_size": 8}, {"stride": 2, "patch_size": 4})
    assert parse_vary(["mlp_ratio=2.5", "attn_backend=math"]) == ({"mlp_ratio": 2.5, "attn_backend": "math"},)
    with pytest.raises(ValueError, match="different numbers of values"):
        parse_vary(["stride=4,2", "patch_size=8"])
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        parse_vary(["stride"])
    with pytest.raises(ValueError, match="given twice"):
        parse_vary(["stride=4", "stride=2"])


def test_families_stand_for_their_matched_models():
    assert acc.resolve_models(None, ["vit", "perceiver", "bixt-ablation"]) == (
        "bixt_cpu", "vit_cpu", "perceiver_cpu", "bixt_cpu_sequential", "bixt_cpu_iterative")
    assert acc.resolve_models(["bixt_digits"], ["vit_ti_p16"]) == ("bixt_digits", "vit_ti_p16")
    with pytest.raises(ValueError, match="unknown baseline 'resnet'"):
        acc.resolve_models(None, ["resnet"])


def test_a_subset_is_fixed_whatever_the_seed_and_forwards_the_epoch():
    a = build_data("digits", img_size=8, seed=0)
    b = build_data("digits", img_size=8, seed=5)
    sa, sb = take(a.train, 100, "train"), take(b.train, 100, "train")
    assert sa.indices == sb.indices and len(sa) == 100 and len(set(sa.indices)) == 100
    assert torch.equal(a.train.y[sa.indices], sa.__getitems__(list(range(100)))[1])
    sa.epoch = 3
    assert a.train.epoch == 3 and sa.epoch == 3
    assert take(a.test, None, "test") is a.test
    with pytest.raises(ValueError, match="--train-samples 5000 is more than the 1437 train samples"):
        take(a.train, 5000, "train")
    with pytest.raises(ValueError, match="--test-samples must be >= 1"):
        TrainConfig(test_samples=0)


def _fake_runner(log, stop_after=None):
    def run(cfg, on_epoch):
        log.append(cfg)
        if stop_after is not None and len(log) > stop_after:
            raise KeyboardInterrupt
        bonus = (0.1 if cfg.model == "bixt_cpu" else 0.0) + 0.001 * cfg.model_args.get("stride", 0)
        acc_ = 0.5 + 0.01 * cfg.seed + bonus
        return {"status": "ok", "message": "", "test_acc": acc_, "test_top5": 1.0, "test_loss": 1.0,
                "train_acc": acc_, "train_samples_per_s": 100.0 + cfg.seed, "train_s": 10.0 + cfg.seed,
                "wall_s": 12.0, "peak_mem_mib": 500.0 + cfg.seed, "mem_kind": "process RSS"}
    return run


STUDY = acc.Study("digits", ("bixt_cpu", "vit_cpu"), ({"stride": 4, "patch_size": 8}, {"stride": 2, "patch_size": 4}),
                  (0, 1, 2), {"epochs": 2, "batch_size": 32, "train_samples": 64})


def test_every_run_shares_the_recipe_and_the_seed_sets_the_data_order(tmp_path):
    log = []
    rows = acc.run_study(STUDY, tmp_path / "s", runner=_fake_runner(log))
    assert len(rows) == len(log) == 12
    assert {(c.epochs, c.batch_size, c.train_samples, c.data) for c in log} == {(2, 32, 64, "digits")}
    # seed-major inside a setting: a stopped study holds whole seeds
    assert [(c.model, c.seed) for c in log[:4]] == [("bixt_cpu", 0), ("vit_cpu", 0), ("bixt_cpu", 1), ("vit_cpu", 1)]
    assert [r["tokens"] for r in rows[:6]] == [49] * 6 and [r["tokens"] for r in rows[6:]] == [196] * 6
    assert len({c.out for c in log}) == 12
    recipe = json.loads((tmp_path / "s" / "recipe.json").read_text())
    assert recipe["epochs"] == 2 and recipe["lr"] == TrainConfig().lr and "seed" not in recipe


def test_the_summary_is_the_mean_and_unbiased_std_over_seeds(tmp_path):
    acc.run_study(STUDY, tmp_path / "s", runner=_fake_runner([]))
    with open(tmp_path / "s" / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    row = next(r for r in table if r["model"] == "bixt_cpu" and r["tokens"] == "196")
    seeds = [0.5 + 0.01 * s + 0.1 + 0.002 for s in range(3)]
    assert float(row["acc_mean"]) == pytest.approx(np.mean(seeds))
    assert float(row["acc_std"]) == pytest.approx(np.std(seeds, ddof=1))
    assert row["accs"] == " ".join(f"{a:.4f}" for a in seeds) and row["seeds"] == "3"
    assert float(row["peak_mem_mib"]) == 502.0 and float(row["train_s"]) == 11.0
    for name in ("accuracy_vs_gmacs.png", "accuracy_vs_time.png", "accuracy_vs_tokens.png"):
        assert (tmp_path / "s" / name).stat().st_size > 1000


def test_a_stopped_study_keeps_its_rows_and_continues_where_it_stopped(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        acc.run_study(STUDY, out, runner=_fake_runner([], stop_after=5))
    kept = json.loads((out / "results.json").read_text())
    assert len(kept) == 5 and len(list(csv.DictReader(open(out / "results.csv")))) == 5
    log = []
    rows = acc.run_study(STUDY, out, runner=_fake_runner(log))
    assert len(log) == 7 and len(rows) == 12
    assert rows[:5] == kept
    other = acc.Study("digits", ("bixt_cpu",), seeds=(0,), recipe={"epochs": 1})
    with pytest.raises(ValueError, match="holds another study"):
        acc.run_study(other, out, runner=_fake_runner([]))


def test_a_failed_run_is_a_row_and_the_study_goes_on(tmp_path):
    def run(cfg, on_epoch):
        if cfg.model == "vit_cpu":
            return {"status": "error", "message": "exit code 1: boom", "wall_s": 1.0}
        return _fake_runner([])(cfg, on_epoch)

    rows = acc.run_study(STUDY, tmp_path / "s", runner=run)
    assert [r["status"] for r in rows].count("error") == 6
    assert {r["model"] for r in acc.summarize(rows)} == {"bixt_cpu"}


def test_equal_wall_clock_gives_the_epochs_the_measured_step_fits(tmp_path):
    study = acc.Study("digits", ("bixt_cpu", "vit_cpu"), seeds=(0,),
                      recipe={"batch_size": 32, "train_samples": 320}, train_seconds=10.0)

    def measurer(setup, mode, plan):  # 10 steps per epoch; bixt 0.3 s a step, vit 0.2 s
        assert mode == "train" and setup.batch_size == 32
        return {"status": "ok", "step_ms": 300.0 if setup.model == "bixt_cpu" else 200.0}

    log = []
    acc.run_study(study, tmp_path / "s", runner=_fake_runner(log), measurer=measurer)
    assert {c.model: c.epochs for c in log} == {"bixt_cpu": 3, "vit_cpu": 5}


def test_the_models_are_checked_against_the_data_before_anything_runs(tmp_path):
    study = acc.Study("digits", ("bixt_cpu", "bixt_shapes"), seeds=(0,))
    with pytest.raises(ValueError, match="takes points inputs but --data digits gives image"):
        acc.run_study(study, tmp_path / "s", runner=_fake_runner([]))
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, message", [
    (["--seq-lens", "16"], "--seq-lens is one of the cost sweep's"),
    (["--vary", "stride=4,2", "--vary", "patch_size=8"], "different numbers of values"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--train-seconds", "nan"], "--train-seconds must be positive"),
    (["--baselines", "resnet"], "unknown baseline 'resnet'"),
    (["--train-samples", "99999"], "--train-samples 99999 is more than the 1437 train samples"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_compare_training_refuses_bad_options_in_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["compare", "--data", "digits", *args, "--out", str(tmp_path / "s")])
    assert_one_line_error(result, message)
    assert not (tmp_path / "s").exists()


def test_training_options_need_data(tmp_path):
    assert_one_line_error(runner.invoke(app, ["compare", "--epochs", "3", "--out", str(tmp_path / "s")]),
                          "--epochs is one of training options: add --data SPEC")


@pytest.mark.slow
def test_quick_study_end_to_end_matches_bixt_train(tmp_path):
    """The quick mode through the CLI: every run in a fresh process, its numbers those of `bixt train` itself."""
    out = tmp_path / "q"
    result = runner.invoke(app, ["compare", "--data", "digits", "--quick", "--baselines", "vit", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["seed"], r["status"]) for r in rows] == [
        ("bixt_cpu", 0, "ok"), ("vit_cpu", 0, "ok"), ("bixt_cpu", 1, "ok"), ("vit_cpu", 1, "ok")]
    assert all(r["peak_mem_mib"] > 0 and r["train_samples_per_s"] > 0 for r in rows)
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["model"], r["seeds"]) for r in table] == [("bixt_cpu", "2"), ("vit_cpu", "2")]
    assert float(table[0]["acc_std"]) == pytest.approx(statistics.stdev([rows[0]["test_acc"], rows[2]["test_acc"]]))
    recipe = json.loads((out / "study.json").read_text())["recipe"]
    direct = train({**recipe, "data": "digits", "model": "bixt_cpu", "seed": 1, "out": str(tmp_path / "direct")})
    assert direct.last["test_acc"] == rows[2]["test_acc"]
    assert direct.last["test_loss"] == pytest.approx(rows[2]["test_loss"], rel=1e-6)
