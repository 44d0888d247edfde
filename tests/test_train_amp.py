"""`--amp` on the CPU (bf16 autocast where the processor computes in bf16, a one-line refusal elsewhere), `bixt eval
--amp`, and `--grad-checkpointing` (the same weights as without; an option a resume may change)."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from test_train import TINY, columns, max_diff
from typer.testing import CliRunner

from bixt.io.checkpoint import read_state_dict
from bixt.nn import precision
from bixt.train import evaluate_checkpoint, read_config_file, resolve_config, rundir, train
from bixt.train.loop import _checkpoint_activations
from bixt_cli.main import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """The probe says yes: autocast runs bf16 on any CPU (emulated where the processor lacks it, only slower),
    so the functional tests hold on every machine."""
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)


@pytest.fixture
def no_bf16_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """TINY in float32, without checkpointing."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert train({**TINY, "out": str(run)}).status == "finished"
    return run


def test_cpu_amp_is_refused_in_one_line_where_the_cpu_lacks_bf16(no_bf16_cpu, reference, tmp_path):
    run = tmp_path / "run"
    assert_one_line_error(runner.invoke(app, ["train", "--amp", "--device", "cpu", "--out", str(run)]),
                          precision.CPU_REFUSAL)
    assert not run.exists()  # refused before the run folder was made
    assert_one_line_error(runner.invoke(app, ["eval", "--amp", "--device", "cpu", "--checkpoint", str(reference)]),
                          precision.CPU_REFUSAL)


def test_cpu_amp_trains_under_bf16_autocast(bf16_cpu, tmp_path):
    run = tmp_path / "amp"
    seen = set()

    def spy(epoch, step, model):  # the head's dtype in the next forward shows autocast is on
        if not seen:
            model.head.register_forward_hook(lambda m, i, out: seen.add(out.dtype))

    result = train({**TINY, "amp": True, "device": "cpu", "out": str(run)}, on_step=spy)
    assert result.status == "finished" and result.epochs_done == TINY["epochs"]
    assert seen == {torch.bfloat16}  # training and evaluation forwards alike
    weights = read_state_dict(run / rundir.LAST)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())  # fp32 masters
    assert torch.load(run / rundir.STATE, weights_only=True)["scaler"] is None  # bf16 needs no loss scaling
    assert read_config_file(run / rundir.CONFIG)["amp"] is True
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"]) for row in columns(run))


@pytest.mark.parametrize("backend", ["math", "sdpa", "fused"])
def test_every_cpu_backend_trains_under_amp(bf16_cpu, backend, tmp_path):
    """The fused backend casts bf16 inputs to float32 for its running sums; math and sdpa take bf16 as it is."""
    model_args = {**TINY["model_args"], "attn_backend": backend}
    run = tmp_path / backend
    result = train({**TINY, "model_args": model_args, "epochs": 1, "amp": True, "device": "cpu", "out": str(run)})
    assert result.status == "finished"
    row = rundir.read_metrics(run)[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])
    assert all(torch.isfinite(w).all() for w in read_state_dict(run / rundir.LAST).values())


def test_eval_amp_matches_float32(bf16_cpu, reference):
    full = evaluate_checkpoint(reference, device="cpu")
    amp = evaluate_checkpoint(reference, device="cpu", amp=True)
    assert amp["samples"] == full["samples"] == 32
    assert abs(amp["top1"] - full["top1"]) <= 2 / 32 and abs(amp["loss"] - full["loss"]) < 0.05
    result = runner.invoke(app, ["eval", "--amp", "--device", "cpu", "--json", "--checkpoint", str(reference)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == amp["top1"]


def test_grad_checkpointing_gives_the_same_weights(reference, tmp_path, monkeypatch):
    import bixt.models.base as base

    calls = []
    checkpoint = base.checkpoint
    monkeypatch.setattr(base, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    run = tmp_path / "ckpt"
    result = train({**TINY, "grad_checkpointing": True, "out": str(run)})
    assert result.status == "finished" and calls  # the layers did recompute
    # Drop-path's masks are replayed in the recomputation, so not one number differs from the plain run.
    assert max_diff(reference / rundir.LAST, run / rundir.LAST) <= 1e-6
    assert columns(run) == columns(reference)


def test_grad_checkpointing_round_trips_and_may_change_on_resume(reference, tmp_path):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(json.dumps({**TINY, "epochs": 1}))  # JSON is YAML
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(tiny), "--grad-checkpointing", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert read_config_file(run / rundir.CONFIG)["grad_checkpointing"] is True
    assert read_config_file(reference / rundir.CONFIG)["grad_checkpointing"] is False
    # Memory, not math: a resume may switch it; --amp changes the numbers and stays refused.
    assert resolve_config({"grad_checkpointing": True}, resume=reference).grad_checkpointing is True
    assert resolve_config({}, resume=run).grad_checkpointing is True
    with pytest.raises(ValueError, match="amp differ"):
        resolve_config({"amp": True}, resume=reference)


def test_grad_checkpointing_on_a_model_without_it_is_one_line():
    with pytest.raises(ValueError, match="no gradient checkpointing.*drop --grad-checkpointing"):
        _checkpoint_activations(torch.nn.Linear(2, 2), "linear")
