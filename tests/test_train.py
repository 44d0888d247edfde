"""Training: config resolution, optimizer groups and schedule, run folder, exact resume after SIGKILL and Ctrl-C,
non-finite loss, every model family, evaluation (ours and the authors' layout) and bad input at the CLI."""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_one_line_error
from typer.testing import CliRunner

import bixt
from bixt.io.checkpoint import read_state_dict
from bixt.models.official import bixt_to_official
from bixt.train import TrainingDiverged, read_config_file, resolve_config, rundir, train
from bixt.train.engine import build_optimizer, build_scheduler, param_groups
from bixt_cli.main import app

runner = CliRunner()
TINY_MODEL = {"dim": 32, "depth": 2, "num_latents": 8, "heads": 2}
# 4 steps of 16 clouds per epoch; drop-path makes the RNG state part of what a resume must restore.
TINY = {"data": "shapes:points=32,train=64,test=32", "model_args": {**TINY_MODEL, "drop_path_rate": 0.1},
        "epochs": 3, "batch_size": 16, "warmup_epochs": 1, "workers": 0}
# One thread everywhere: tiny models gain nothing from more, a busy machine makes more threads crawl, and the
# in-process and subprocess runs compared to 1e-6 must reduce in the same order.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def columns(run: Path) -> list[dict]:
    """The metrics of a run that do not depend on the clock (nor are blank: a classifier has no mIoU)."""
    return [{k: v for k, v in row.items() if k != "seconds" and v is not None} for row in rundir.read_metrics(run)]


def max_diff(a: Path, b: Path) -> float:
    wa, wb = read_state_dict(a), read_state_dict(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_same_run(one: Path, two: Path, epochs: int, weights_tol: float = 1e-5) -> None:
    """Two run folders hold the same weights (to `weights_tol`) and the same metrics (to 1e-5) for `epochs`."""
    assert max_diff(one / "last.safetensors", two / "last.safetensors") <= weights_tol
    a_rows, b_rows = columns(one), columns(two)
    assert len(a_rows) == len(b_rows) == epochs
    for a, b in zip(a_rows, b_rows, strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """TINY trained without interruption."""
    run = tmp_path_factory.mktemp("ref") / "run"
    result = train({**TINY, "out": str(run)})
    assert result.status == "finished" and result.epochs_done == 3
    return run


def test_model_args_from_the_command_line_add_to_the_config_files(tmp_path):
    from bixt_cli.app import parse_model_args

    assert parse_model_args(["depth=4", "attn_backend=sdpa", "drop_path_rate=0.1", "layerscale=null"]) == {
        "depth": 4, "attn_backend": "sdpa", "drop_path_rate": 0.1, "layerscale": None}
    yml = tmp_path / "c.yaml"
    yml.write_text("model_args: {depth: 3, dim: 48}\n")
    cfg = resolve_config({"model_args": {"dim": 32, "heads": 2}}, config_file=yml)
    assert cfg.model_args == {"depth": 3, "dim": 32, "heads": 2}


def test_config_files_and_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('epochs = 7\nbatch-size = 32\nlr = 1\n[model_args]\ndim = 48\n')
    yml = tmp_path / "c.yaml"
    yml.write_text("epochs: 5\nweight_decay: 0\nlr: 1e-3\nmodel_args: {depth: 3}\n")
    assert read_config_file(toml) == {"epochs": 7, "batch_size": 32, "lr": 1, "model_args": {"dim": 48}}
    cfg = resolve_config({"epochs": 9, "seed": None}, config_file=toml)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.model_args) == (9, 32, 1.0, {"dim": 48})  # options win
    assert isinstance(cfg.lr, float)
    cfg = resolve_config({}, config_file=yml)
    assert (cfg.epochs, cfg.weight_decay, cfg.lr, cfg.model_args) == (5, 0.0, 1e-3, {"depth": 3})
    for text, message in [("epochs: ten\n", "epochs must be int"), ("colour: 1\n", "unknown option"),
                          ("- 1\n", "must hold a mapping"), ("epochs: 0\n", "--epochs must be >= 1")]:
        yml.write_text(text)
        with pytest.raises(ValueError, match=message):
            resolve_config({}, config_file=yml)


def test_param_groups_leave_norms_biases_latents_and_tokens_undecayed():
    model = bixt.create_model("bixt_digits")
    decay, no_decay = (g["params"] for g in param_groups(model, 0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay}
    assert "latents" in undecayed and "fc_norm.weight" in undecayed and "head.bias" in undecayed
    assert all(n.endswith(".weight") and "norm" not in n for n in (names[id(p)] for p in decay))
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    # Independent count: decayed = weights of Linear/Conv layers, i.e. every parameter with more than one
    # dimension except the latents.
    assert sum(p.numel() for p in decay) == sum(p.numel() for n, p in model.named_parameters()
                                                if p.ndim > 1 and n != "latents")
    model = bixt.create_model("vit_ti_p16", dim=32, depth=1, heads=2)  # the baselines are part of the project
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in param_groups(model, 0.05)[1]["params"]}
    assert {"cls_token", "tokenizer.pos_embed.weight"} <= undecayed


def test_schedule_is_linear_warmup_then_cosine():
    opt = build_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.0)
    sched = build_scheduler(opt, total_steps=110, warmup_steps=10, min_lr=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.01 + 0.99 * 5 / 10)
    for t in (10, 40, 60, 109):  # cosine from 1 to 0.1 over the 100 steps after warm-up
        assert lrs[t] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * (t - 10) / 100)) / 2, rel=1e-6)


def test_run_folder_contents(reference):
    files = {p.name for p in reference.iterdir()}
    assert {"config.yaml", "metrics.csv", "curves.png", "best.safetensors", "last.safetensors", "last.state.pt",
            "summary.json"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    rows = rundir.read_metrics(reference)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and list(rows[0]) == list(rundir.COLUMNS)
    saved = read_config_file(reference / "config.yaml")
    assert saved["model"] == "bixt_shapes" and saved["model_args"]["num_classes"] == 10
    state = torch.load(reference / "last.state.pt", weights_only=True)  # loads without unpickling code
    assert state["epoch"] == 3 and state["step"] == 0 and {"optimizer", "scheduler", "rng"} <= set(state)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["best_acc"] == max(r["test_acc"] for r in rows)


KILL_AFTER_SECOND_CHECKPOINT = """
import json, os, signal, sys
from bixt.train import train

def hook(epoch, step, model):
    if epoch == 2 and step == 1:  # two epochs (two checkpoints) done, one step into the third
        os.kill(os.getpid(), signal.SIGKILL)

train(json.loads(sys.argv[1]), on_step=hook)
"""


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(reference, tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_SECOND_CHECKPOINT, json.dumps({**TINY, "out": str(run)})],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(run / "last.state.pt", weights_only=True)["epoch"] == 2
    assert len(rundir.read_metrics(run)) == 2
    result = train(None, resume=run)
    assert result.status == "finished" and result.epochs_done == 3
    assert max_diff(reference / "last.safetensors", run / "last.safetensors") <= 1e-6
    assert columns(run) == columns(reference)


def test_ctrl_c_saves_mid_epoch_and_resume_is_exact(reference, tmp_path):
    run = tmp_path / "stopped"

    def ctrl_c(epoch, step, model):
        if epoch == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result = train({**TINY, "out": str(run)}, on_step=ctrl_c)
    assert (result.status, result.signal) == ("interrupted", signal.SIGINT)
    state = torch.load(run / "last.state.pt", weights_only=True)
    # The flag is shared between processes with the next step's reduction: that step completes, then the save.
    assert (state["epoch"], state["step"]) == (1, 3)
    train(None, resume=run / "last.safetensors")
    assert max_diff(reference / "last.safetensors", run / "last.safetensors") <= 1e-6
    assert columns(run) == columns(reference)


@pytest.mark.slow
def test_cli_ctrl_c_exits_130_with_a_checkpoint(tmp_path):
    cfg = tmp_path / "long.yaml"
    cfg.write_text(json.dumps({**TINY, "epochs": 500}))  # JSON is YAML
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "bixt_cli.main", "train", "--config", str(cfg), "--out", str(run)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "last.state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "bixt train --resume" in err
    state = torch.load(run / "last.state.pt", weights_only=True)
    assert state["epoch"] < 500 and len(rundir.read_metrics(run)) == len(state["history"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "nan"

    def poison(epoch, step, model):
        if epoch == 1 and step == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 6 \(epoch 2, batch 2\)"):
        train({**TINY, "out": str(run)}, on_step=poison)
    weights, state = rundir.load_checkpoint_state(run)
    assert state["epoch"] == 1 and all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("name, args, data", [
    ("bixt_digits", {"depth": 1, "dim": 32}, "digits"),
    ("vit_ti_p16", {"img_size": 8, "patch_size": 4, "stride": 2, "dim": 32, "depth": 1, "heads": 2}, "digits"),
    ("perceiver_ti", {"img_size": 8, "patch_size": 2, "stride": 2, "dim": 32, "num_latents": 8, "num_blocks": 1,
                      "self_per_block": 1, "heads": 2, "fourier_bands": 4, "max_freq": 8.0}, "digits"),
    ("vit_ti_points", {"dim": 32, "depth": 1, "heads": 2}, "shapes:points=32,train=32,test=16"),
    ("perceiver_ti_points", {"dim": 32, "num_latents": 8, "num_blocks": 1, "self_per_block": 1, "heads": 2},
     "shapes:points=32,train=32,test=16"),
    ("bixt_bytes", {"dim": 32, "depth": 1}, "listops:length=48,train=32,test=16,depth=2"),
    ("vit_ti_text", {"dim": 32, "depth": 1, "heads": 2}, "listops:length=48,train=32,test=16,depth=2"),
    ("perceiver_ti_text", {"dim": 32, "num_latents": 8, "num_blocks": 1, "self_per_block": 1, "heads": 2},
     "listops:length=48,train=32,test=16,depth=2"),
])
def test_every_family_trains(name, args, data, tmp_path):
    result = train({"model": name, "model_args": args, "data": data, "epochs": 1, "batch_size": 32,
                    "out": str(tmp_path / "run")})
    assert result.status == "finished" and 0 <= result.last["test_acc"] <= 1
    assert math.isfinite(result.last["train_loss"])


def test_eval_reproduces_the_runs_best_accuracy(reference):
    result = runner.invoke(app, ["eval", "--checkpoint", str(reference), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    best = max(rundir.read_metrics(reference), key=lambda r: r["test_acc"])
    assert got["top1"] == pytest.approx(best["test_acc"], abs=1e-9) and got["samples"] == 32
    assert got["loss"] == pytest.approx(best["test_loss"], rel=1e-5)
    assert got["model"] == "bixt_shapes" and got["checkpoint"].endswith("best.safetensors")


def test_eval_authors_checkpoint_on_an_imagenet_layout_folder(tmp_path):
    """The authors' key layout, wrapped as their training script saves it, on val/<wnid>/ images; the loss is
    recomputed here from the pixels with plain slicing (256 px images: the resize is the identity, the centre
    crop is [16:240]) and the ImageNet mean/std."""
    from PIL import Image

    torch.manual_seed(0)
    model = bixt.create_model("bixt_ti_l64_p16").eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.05)  # the init zeroes the head: give it something to rank
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 300, "state_dict": bixt_to_official(model.state_dict())}, ckpt)
    images, labels = [], []
    for label, wnid in enumerate(["n01440764", "n01443537"]):
        for i in range(2):
            pixels = torch.randint(0, 256, (256, 256, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(
                10 * label + i))
            path = tmp_path / "imnet" / "val" / wnid / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy()).save(path)
            images.append(pixels[16:240, 16:240].permute(2, 0, 1).float() / 255)
            labels.append(label)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        logits = model((torch.stack(images) - mean) / std)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item()
    result = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--data", f"imagefolder:{tmp_path / 'imnet'}",
                                 "--json", "--workers", "0"])  # no --model: the weights' shapes name it
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["model"] == "bixt_ti_l64_p16" and got["samples"] == 4
    assert got["loss"] == pytest.approx(expected, rel=1e-4)
    assert got["top1"] == pytest.approx((logits.argmax(1) == torch.tensor(labels)).float().mean().item())


class _Evil:
    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_cli_bad_input_is_one_line_exit_2_and_loses_nothing(reference, tmp_path):
    evil = _Evil()
    evil.sentinel = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": evil}, protocol=2))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    evil_run = tmp_path / "evil_run"
    evil_run.mkdir()
    (evil_run / "config.yaml").write_text((reference / "config.yaml").read_text())
    (evil_run / "last.state.pt").write_bytes(pickle.dumps({"epoch": evil}, protocol=2))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "precious.txt").write_text("keep me")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("epochs = [\n")
    cases = [
        (["train", "--model", "bixt_nope"], "unknown model 'bixt_nope'"),
        (["train", "--data", "mnist"], "unknown data spec 'mnist'"),
        (["train", "--data", f"imagefolder:{tmp_path / 'missing'}"], "does not exist"),
        (["train", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["train", "--epochs", "-2"], "--epochs must be >= 1, got -2"),
        (["train", "--batch-size", "-1"], "--batch-size must be >= 1"),
        (["train", "--lr", "-0.1"], "--lr must be > 0"),
        (["train", "--model", "bixt_shapes"], "takes points inputs but --data digits gives image"),
        (["train", "--out", str(taken)], "already exists and is not empty"),
        (["train", "--config", str(bad_toml)], "is not valid TOML"),
        (["train", "--config", str(tmp_path / "none.yaml")], "does not exist"),
        (["train", "--model-arg", "=4"], "--model-arg needs KEY=VALUE"),
        (["train", "--model-arg", "heads_count=3"], "has no option heads_count"),
        (["train", "--resume", str(evil_run)], "was refused, not unpickled"),
        (["train", "--resume", str(reference), "--lr", "0.5"], "lr differ(s)"),
        (["train", "--resume", str(tmp_path / "nowhere")], "does not exist"),
        (["eval", "--checkpoint", str(tmp_path / "evil.pth"), "--model", "bixt_digits", "--data", "digits"],
         "refused, not unpickled"),
        (["eval", "--checkpoint", str(tmp_path / "corrupt.safetensors"), "--model", "bixt_digits", "--data",
          "digits"], "is not a readable safetensors file"),
        (["eval", "--checkpoint", str(reference / "best.safetensors"), "--model", "bixt_digits", "--data", "digits"],
         "checkpoint does not fit this model"),
        (["eval", "--checkpoint", str(tmp_path / "absent.safetensors")], "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases += [(["train", "--device", "cuda"], "sees no CUDA device")]  # CPU --amp: tests/test_train_amp.py
    before = {p: p.stat().st_mtime_ns for p in reference.iterdir()}
    for args, message in cases:
        assert_one_line_error(runner.invoke(app, args), message)
    assert not evil.sentinel.exists()  # the malicious pickles ran nothing
    assert (taken / "precious.txt").read_text() == "keep me" and len(list(taken.iterdir())) == 1
    assert before == {p: p.stat().st_mtime_ns for p in reference.iterdir()}  # the refused resume touched nothing


def test_cli_trains_digits_and_prints_a_summary(tmp_path):
    run = tmp_path / "digits"
    result = runner.invoke(app, ["train", "--epochs", "1", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "best test acc" in result.stdout and "532,042" in result.stdout  # bixt_digits
    assert len(rundir.read_metrics(run)) == 1 and (run / "curves.png").stat().st_size > 1000
