"""Training-side faults: non-finite hyper-parameters, weights and gradients that overflow, resuming from a folder
with no (or a broken) checkpoint, two runs on one folder, an --out folder already used, and model_args of the wrong
type. Each is refused up front as one line (exit 2 at the CLI), or stops the run before anything non-finite is
saved; nothing already on disk is lost."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, assert_one_line_error
from typer.testing import CliRunner

from bixt.io.checkpoint import read_state_dict
from bixt.train import TrainConfig, TrainingDiverged, engine, rundir, train
from bixt.train.build import build_model, checked_config
from bixt_cli.main import app

runner = CliRunner()
# 4 steps of 16 clouds per epoch (as in test_train.py).
TINY = {"data": "shapes:points=32,train=64,test=32", "epochs": 2, "batch_size": 16, "warmup_epochs": 1, "workers": 0,
        "model_args": {"dim": 32, "depth": 2, "num_latents": 8, "heads": 2}}
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
HOLD_LOCK = ("import sys, time; from bixt.train import rundir; "
             "h = rundir.lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """TINY trained for one epoch: a run folder with a checkpoint."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train({**TINY, "epochs": 1, "out": str(run)}).status == "finished"
    return run


def config_file(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps({**TINY, **overrides}))  # JSON is YAML
    return path


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in read_state_dict(path).values())


# --- 1. non-finite hyper-parameters


@pytest.mark.parametrize("args, message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
])
def test_cli_refuses_non_finite_float_options(args, message, tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(runner.invoke(app, ["train", "--config", str(config_file(tmp_path)), *args,
                                              "--out", str(out)]), message)
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("lr: .inf\n", "--lr must be a finite number, got inf"),
    ("lr: -.inf\n", "--lr must be a finite number, got -inf"),
    ("min_lr: .nan\n", "min_lr must be a finite number, got nan"),
    ("weight_decay: .inf\n", "--weight-decay must be a finite number"),
    ("label_smoothing: .nan\n", "label_smoothing must be a finite number"),
    ("clip_grad: .inf\n", "clip_grad must be a finite number, got inf: give a finite value (the default is 1.0; "
                          "null for no clipping)"),
    ("lr: inf\n", "--lr must be a finite number"),  # a string YAML leaves to float()
])
def test_config_files_with_non_finite_floats_are_refused(text, message, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = tmp_path / "run"
    assert_one_line_error(runner.invoke(app, ["train", "--config", str(cfg), "--out", str(out)]), message)
    assert not out.exists()
    with pytest.raises(ValueError, match="must be a finite number"):  # the library refuses it too
        TrainConfig(**yaml.safe_load(text))


# --- 2. weights and gradients that become non-finite


def test_weights_that_overflow_in_the_update_stop_the_run_before_they_are_saved(tmp_path, monkeypatch):
    """An optimizer step that leaves a weight infinite at the last step of epoch 2: before the epoch is saved."""
    calls = []

    class Overflowing(torch.optim.AdamW):
        def step(self, closure=None):
            out = super().step(closure)
            calls.append(1)
            if len(calls) == 8:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("inf"))
            return out

    monkeypatch.setattr(engine, "build_optimizer", lambda model, lr, wd: Overflowing(engine.param_groups(model, wd),
                                                                                     lr=lr))
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"weight \S+ is not finite after the update at step 8 \(epoch 2, "
                                               r"batch 4\); nothing of it was saved"):
        train({**TINY, "out": str(run)})
    weights, state = rundir.load_checkpoint_state(run)
    assert state["epoch"] == 1 and all(torch.isfinite(w).all() for w in weights.values())
    assert finite(run / rundir.BEST) and len(rundir.read_metrics(run)) == 1


def test_a_non_finite_gradient_norm_stops_the_run_before_the_update(tmp_path, monkeypatch):
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def exploding(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append(1)
        if len(calls) == 8:
            params[0].grad.fill_(float("inf"))
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", exploding)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the gradient norm is (inf|nan) at step 8 \(epoch 2, batch 4\)"):
        train({**TINY, "out": str(run)})
    weights, state = rundir.load_checkpoint_state(run)
    assert state["epoch"] == 1 and all(torch.isfinite(w).all() for w in weights.values())


def test_a_non_finite_test_loss_keeps_the_epoch_out_of_the_checkpoints(tmp_path, monkeypatch):
    real, calls = engine.evaluate, []

    def broken(*args, **kwargs):
        calls.append(1)
        return {**real(*args, **kwargs), **({"loss": math.nan} if len(calls) == 2 else {})}

    monkeypatch.setattr(engine, "evaluate", broken)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"test loss is nan after epoch 2; nothing of that epoch was saved"):
        train({**TINY, "out": str(run)})
    assert rundir.load_checkpoint_state(run)[1]["epoch"] == 1 and len(rundir.read_metrics(run)) == 1


def test_cli_an_lr_that_overflows_float32_is_one_line_not_a_traceback(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config_file(tmp_path)), "--lr", "1e38", "--warmup-epochs",
                                 "0", "--out", str(run)])
    assert result.exit_code == 1, result.output  # a diverged run, as with a NaN loss
    last_line = result.output.strip().splitlines()[-1]  # after what the progress display printed
    assert "error: the weight update overflows float32 at step 1" in last_line, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert not (run / rundir.LAST).exists() and not (run / rundir.BEST).exists()


# --- 3. --resume without a (readable) checkpoint


def copy_run(run: Path, to: Path, state: bytes | None) -> Path:
    """`run`'s config and weights in `to`, with `state` as last.state.pt (None: no state file)."""
    to.mkdir()
    for name in (rundir.CONFIG, rundir.LAST):
        shutil.copy(run / name, to / name)
    if state is not None:
        (to / rundir.STATE).write_bytes(state)
    return to


def test_resume_without_a_checkpoint_is_refused_instead_of_restarting(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run", None)
    before = snapshot(run)
    assert_one_line_error(runner.invoke(app, ["train", "--resume", str(run)]),
                          f"{run / rundir.STATE} does not exist, so there is nothing to resume: start a new run "
                          "with --out")
    assert snapshot(run) == before


@pytest.mark.parametrize("corrupt", ["empty", "truncated", "text"])
def test_resume_from_a_corrupt_state_file_is_one_line(corrupt, finished, tmp_path):
    good = (finished / rundir.STATE).read_bytes()
    content = {"empty": b"", "truncated": good[: len(good) // 2], "text": b"hello"}[corrupt]
    run = copy_run(finished, tmp_path / "run", content)
    before = snapshot(run)
    assert_one_line_error(runner.invoke(app, ["train", "--resume", str(run)]),
                          f"{run / rundir.STATE} is a corrupt or empty checkpoint")
    assert snapshot(run) == before  # nothing written, no lock file left behind


# --- 4. two runs on one folder


def test_a_finished_run_leaves_no_lock_behind(finished):
    assert not (finished / rundir.LOCK).exists()


def test_a_locked_folder_refuses_a_new_run_and_a_resume(finished, tmp_path):
    busy = tmp_path / "busy"
    held = rundir.lock(busy)
    try:
        assert (busy / rundir.LOCK).read_text().strip() == str(os.getpid())
        message = f"{busy} is in use by another bixt train (pid {os.getpid()})"
        with pytest.raises(ValueError, match="choose another --out"):
            train({**TINY, "out": str(busy)})
        assert_one_line_error(runner.invoke(app, ["train", "--config", str(config_file(tmp_path)), "--out",
                                                  str(busy)]), message)
        with pytest.raises(ValueError, match="in use"):  # a second open file description conflicts, same process
            rundir.lock(busy)
        assert [p.name for p in busy.iterdir()] == [rundir.LOCK]
    finally:
        held.release()
    assert not busy.exists() or not list(busy.iterdir())

    run = copy_run(finished, tmp_path / "resumable", (finished / rundir.STATE).read_bytes())
    with rundir.lock(run):
        before = snapshot(run)
        assert_one_line_error(runner.invoke(app, ["train", "--resume", str(run)]),
                              f"{run} is in use by another bixt train (pid {os.getpid()})")
        assert snapshot(run) == before


def test_a_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path):
    busy = tmp_path / "busy"
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(busy)], env=ENV, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another bixt train \(pid {child.pid}\)"):
            rundir.prepare(str(busy), "x", False, rundir.RunLock())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # Killed, it could not remove its lock file; the lock itself went with it, and the stale file blocks nothing.
    assert (busy / rundir.LOCK).read_text().strip() == str(child.pid)
    lock = rundir.RunLock()
    assert rundir.prepare(str(busy), "x", False, lock) == busy
    assert (busy / rundir.LOCK).read_text().strip() == str(os.getpid())
    lock.release()


@pytest.mark.slow
def test_two_cli_runs_started_together_on_one_folder(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bixt_cli.main", "train", "--config", str(config_file(tmp_path, epochs=1)), "--out",
           str(out)]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    results = sorted(zip([p.returncode for p in procs], errors, strict=True))
    assert [code for code, _ in results] == [0, 2], results
    refusal = results[1][1].strip()
    assert len(refusal.splitlines()) == 1 and ("in use by another bixt train" in refusal
                                               or "already exists and is not empty" in refusal), refusal
    assert len(rundir.read_metrics(out)) == 1 and not (out / rundir.LOCK).exists()


# --- 5. an --out folder already used


def test_an_used_out_folder_says_how_to_go_on(finished, tmp_path):
    with_checkpoint = copy_run(finished, tmp_path / "stopped", (finished / rundir.STATE).read_bytes())
    before = snapshot(with_checkpoint)
    result = runner.invoke(app, ["train", "--config", str(config_file(tmp_path)), "--out", str(with_checkpoint)])
    assert_one_line_error(result, f"--out {with_checkpoint} already exists and is not empty: continue it with "
                                  f"--resume {with_checkpoint}, choose a new --out, or delete {with_checkpoint} first")
    assert snapshot(with_checkpoint) == before
    failed = copy_run(finished, tmp_path / "failed", None)  # stopped before its first checkpoint
    result = runner.invoke(app, ["train", "--config", str(config_file(tmp_path)), "--out", str(failed)])
    assert_one_line_error(result, f"--out {failed} already exists and is not empty: choose a new --out, or delete "
                                  f"{failed} first")
    assert "--resume" not in result.output


def test_a_folder_holding_only_a_stale_lock_file_is_reused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK).write_text("999999\n")  # left by a run killed before it wrote anything
    assert train({**TINY, "epochs": 1, "out": str(out)}).status == "finished"
    assert not (out / rundir.LOCK).exists()


# --- 6. model_args of the wrong type


@pytest.mark.parametrize("value", ["abc", "[1, 2]", "2.5", "null"])
def test_cli_mistyped_model_args_in_a_config_file_are_one_line(value, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: 'shapes:points=32,train=32,test=16'\nepochs: 1\nbatch_size: 16\n"
                   f"model_args: {{depth: {value}}}\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(out)])
    assert_one_line_error(result, "depth")
    assert not out.exists()  # refused before the run folder is made


def test_type_errors_of_model_building_name_the_key_and_its_type(monkeypatch):
    """The train side's safety net: whatever raises a TypeError while the config or the model is made (the
    registry's own type checks may catch it first, or may not), the user gets a ValueError naming the key."""
    import types

    import bixt.models.registry as registry

    with pytest.raises(ValueError, match=r"depth"):
        checked_config("bixt_shapes", {"depth": "abc"})
    mcfg = checked_config("bixt_shapes", {"depth": 3})
    real_config, real_entry = registry.model_config, registry.get_entry("bixt_shapes")

    def typed(name, **overrides):
        if overrides:
            raise TypeError("'<=' not supported between instances of 'list' and 'int'")
        return real_config(name)

    def build(mcfg):
        raise TypeError("'float' object cannot be interpreted as an integer")

    monkeypatch.setattr(registry, "model_config", typed)
    monkeypatch.setattr(registry, "get_entry", lambda name: types.SimpleNamespace(config=real_entry.config,
                                                                                  build=build))
    with pytest.raises(ValueError, match=r"model_args: depth must be int, got \[1, 2\]: fix depth in the config"):
        checked_config("bixt_shapes", {"depth": [1, 2]})
    with pytest.raises(ValueError, match=r"model_args: depth must be int, got 2.5: fix depth"):
        build_model("bixt_shapes", mcfg, {"depth": 2.5})
    with pytest.raises(ValueError, match=r"model_args \{'depth': 3\} do not fit bixt_shapes \('float' object"):
        build_model("bixt_shapes", mcfg, {"depth": 3})  # the right type, yet a TypeError: named as it came
