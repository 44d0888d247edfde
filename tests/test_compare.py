"""The sweep: exponent fitting, time prediction, skip / oom / error rows, incremental files, `bixt compare`'s errors.
Fake runners stand in for the measurements: these tests check the bookkeeping, never timing."""
import csv
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, assert_one_line_error
from typer.testing import CliRunner

from bixt.measure import compare as cmp
from bixt.measure.profile import Plan
from bixt_cli.main import app
from bixt_cli.measure import join_list_values

runner = CliRunner()
PLAN = Plan(warmup_s=0.0, min_iters=3, max_iters=3, target_s=0.0)


def test_fit_exponent_recovers_power_laws():
    x = [256, 1024, 4096, 16384]
    slope, r2 = cmp.fit_exponent(x, [3.0 * n ** 1.5 for n in x])
    assert slope == pytest.approx(1.5) and r2 == pytest.approx(1.0)
    noisy = [n ** 2 * f for n, f in zip(x, (1.1, 0.9, 1.05, 0.97), strict=True)]
    slope, r2 = cmp.fit_exponent(x, noisy)
    assert abs(slope - 2) < 0.05 and 0.99 < r2 < 1.0
    with pytest.raises(ValueError, match="two distinct lengths"):
        cmp.fit_exponent([1024], [5.0])


def _row(model, n, gmacs, status="ok", **extra):
    return {"model": model, "seq_len": n, "batch_size": 1, "gmacs": gmacs, "status": status,
            "infer_status": status, "train_status": status, **extra}


def test_exponents_use_the_lengths_that_ran_from_fit_from():
    rows = [_row("a", n, n * 1e-3, infer_step_ms=n ** 2 * 1e-6) for n in (256, 1024, 4096, 16384)]
    rows[-1].update(status="skipped", infer_status="skipped", infer_step_ms=None)  # gmacs still counted
    rows += [_row("b", n, 1.0 + n * 1e-3) for n in (256, 1024)]
    table = {(e["model"], e["metric"]): e for e in cmp.exponents(rows, fit_from=1024)}
    assert table["a", "gmacs"]["exponent"] == pytest.approx(1.0)
    assert (table["a", "gmacs"]["from_len"], table["a", "gmacs"]["to_len"]) == (1024, 16384)
    step = table["a", "infer_step_ms"]  # only 1024 and 4096 ran at >= 1024
    assert step["exponent"] == pytest.approx(2.0) and step["points"] == 2 and step["to_len"] == 4096
    assert table["b", "gmacs"]["from_len"] == 256  # fewer than two lengths >= 1024: all of them


def test_step_model_predicts_from_the_line_through_measured_steps():
    steps = cmp.StepModel()
    steps.add({"model": "m", "batch_size": 1, "gmacs": 1.0, "infer_status": "ok", "infer_step_ms": 100.0,
               "train_status": "ok", "train_step_ms": 300.0})
    assert steps.step_s("m", "infer", 4e9) == pytest.approx(0.4)  # one point: proportional
    steps.add({"model": "m", "batch_size": 1, "gmacs": 2.0, "infer_status": "ok", "infer_step_ms": 150.0})
    assert steps.step_s("m", "infer", 4e9) == pytest.approx(0.25)  # 0.05 s fixed + 0.05 s per GMAC
    assert steps.step_s("other", "infer", 4e9) == pytest.approx(4e9 / (2e9 / 0.15))  # others' largest step rate
    assert steps.step_s("m", "nope", 1e9) is None
    # count (0.25 s) + per mode: process + (1 warm-up + 3 timed) steps
    expected = 0.25 + cmp.PROCESS_OVERHEAD_S + 4 * 0.25 + cmp.PROCESS_OVERHEAD_S + 4 * 1.2
    assert steps.config_s("m", 4.0, 1, ("infer", "train"), PLAN) == pytest.approx(expected)
    assert cmp.StepModel().config_s("m", 4.0, 1, ("infer",), PLAN) is None  # nothing measured yet: just run it
    # sdpa on BiXT counts twice (the architecture, then what runs); 0: counted before the prediction
    assert steps.config_s("m", 4.0, 1, ("infer", "train"), PLAN, count_traces=2) == pytest.approx(expected + 0.25)
    assert steps.config_s("m", 4.0, 1, ("infer", "train"), PLAN, count_traces=0) == pytest.approx(expected - 0.25)


def fake_count(prep):
    """`count`'s columns from the closed forms: the architecture's (math) and the executed backend's."""
    from bixt.measure.flops import analytic_macs

    closed = analytic_macs(prep.family, prep.config, prep.setup.seq_len, "math")
    executed = analytic_macs(prep.family, prep.config, prep.setup.seq_len, prep.count_backend)
    return {"gmacs": closed.total / 1e9, "gmacs_analytic": closed.total / 1e9, "gmacs_attention": 0.0,
            "gmacs_rest": closed.total / 1e9, "gmacs_executed": executed.total / 1e9,
            "unsupported_ops": {}, "macs_backend": prep.count_backend}


def fake_runner(setup, mode, plan, timeout):
    """1 GMAC/s with the MACs the closed form gives; perceiver fails; vit runs out of memory at 1024 tokens."""
    if setup.model == "perceiver_ti" and setup.seq_len == 256:
        raise RuntimeError("kernel exploded")
    if setup.model == "vit_ti_p16" and setup.seq_len >= 1024:
        return {"status": "oom", "message": f"{mode}: out of memory"}
    from bixt.measure.flops import analytic_macs
    from bixt.measure.profile import prepare

    prep = prepare(setup)
    step = analytic_macs(prep.family, prep.config, setup.seq_len, prep.count_backend).total / 1e9
    step *= 3 if mode == "train" else 1
    return {"status": "ok", "message": "", "peak_mem_mib": setup.seq_len / 100, "act_mem_mib": setup.seq_len / 200,
            "step_ms": step * 1e3, "samples_per_sec": 1 / step, "tokens_per_sec": setup.seq_len / step, "iters": 3}


def test_sweep_records_skipped_oom_and_error_rows_and_goes_on(tmp_path):
    sweep = cmp.Sweep(("bixt_ti_l64_p16", "vit_ti_p16", "perceiver_ti"), (64, 256, 1024, 4096, 16384), budget_s=250.0,
                      plan=PLAN)
    seen = []
    rows = cmp.run_sweep(sweep, tmp_path, runner=fake_runner, counter=fake_count, on_row=seen.append)
    assert len(rows) == len(seen) == 15
    status = {(r["model"], r["seq_len"]): r for r in rows}
    assert status["perceiver_ti", 256]["status"] == "error" and "kernel exploded" in status["perceiver_ti", 256][
        "message"]
    assert status["vit_ti_p16", 1024]["status"] == "oom" and "out of memory" in status["vit_ti_p16", 1024]["message"]
    skipped = status["bixt_ti_l64_p16", 4096]  # ~21 GMACs at 1 GMAC/s: infer (4 steps of 21 s) fits 250 s,
    assert skipped["status"] == "skipped" and skipped["predicted_s"] > 250  # with train (4 of 63 s) it would not
    assert skipped["infer_status"] == "ok" and skipped["train_status"] == "skipped"
    assert skipped["message"].startswith("train: predicted") and "budget 250 s" in skipped["message"]
    assert skipped["gmacs"] is not None  # counted: one forward fits
    assert status["vit_ti_p16", 4096]["infer_status"] == "skipped"
    too_big = status["vit_ti_p16", 16384]  # ~1300 GMACs: not even the count fits
    assert too_big["status"] == "skipped" and too_big["gmacs"] is None and too_big["message"].startswith("count:")
    assert status["bixt_ti_l64_p16", 1024]["status"] == "ok" and status["bixt_ti_l64_p16", 1024]["predicted_s"]
    assert status["perceiver_ti", 1024]["status"] == "ok"  # the sweep went on after its error
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"], r["seq_len"], r["status"]) for r in saved] == [(r["model"], r["seq_len"], r["status"])
                                                                       for r in rows]
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
        assert len(csv_rows) == 15
    assert {"gmacs", "gmacs_executed", "macs_backend"} <= set(csv_rows[0])
    bixt_256 = status["bixt_ti_l64_p16", 256]  # auto runs sdpa here: one similarity matrix more per layer
    assert bixt_256["macs_backend"] == "sdpa" and bixt_256["gmacs_executed"] > bixt_256["gmacs"]
    assert status["vit_ti_p16", 256]["gmacs_executed"] == status["vit_ti_p16", 256]["gmacs"]
    exps = {(r["model"], r["metric"]): float(r["exponent"]) for r in csv.DictReader(open(tmp_path / "exponents.csv"))}
    assert exps["bixt_ti_l64_p16", "infer_peak_mem_mib"] == pytest.approx(1.0)
    assert 1.5 < exps["vit_ti_p16", "gmacs"] < 2.0  # counted at every length, even where the runs failed
    assert ("bixt_ti_l64_p16", "gmacs_executed") in exps
    for name in cmp.PLOTS:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    ratios = {(r["model"], r["seq_len"]): r for r in cmp.ratios(rows)}
    assert ratios["vit_ti_p16", 256]["infer_speedup"] == pytest.approx(
        status["bixt_ti_l64_p16", 256]["infer_samples_per_sec"] / status["vit_ti_p16", 256]["infer_samples_per_sec"])


def test_quick_total_budget_stops_the_sweep(tmp_path):
    def slow(setup, mode, plan, timeout):
        time.sleep(0.6)
        return {"status": "ok", "message": ""}  # no step time: nothing to predict from, so it runs

    sweep = cmp.Sweep(("bixt_ti_l64_p16",), (16, 64, 256, 1024), modes=("infer",), total_s=1.0)
    rows = cmp.run_sweep(sweep, tmp_path, runner=slow, counter=fake_count)
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "skipped"]
    assert rows[-1]["message"] == "the sweep's total time budget is spent" and rows[-1]["gmacs_analytic"] > 0


@pytest.mark.slow
def test_a_killed_sweep_keeps_every_finished_row(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_compare import fake_count
        from bixt.measure import compare as cmp
        def slow(setup, mode, plan, timeout):
            time.sleep(0.3)
            return {{"status": "ok", "message": "", "step_ms": 10.0, "samples_per_sec": 100.0}}
        sweep = cmp.Sweep(("bixt_ti_l64_p16",), tuple(4 ** k for k in range(1, 12)), modes=("infer",))
        cmp.run_sweep(sweep, cmp.Path({str(tmp_path)!r}), runner=slow, counter=fake_count)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    results = tmp_path / "results.json"
    deadline = time.time() + 60
    while time.time() < deadline and (not results.exists() or len(json.loads(results.read_text())) < 3):
        time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = json.loads(results.read_text())  # still valid JSON
    assert len(rows) >= 3 and [r["seq_len"] for r in rows] == [4 ** k for k in range(1, len(rows) + 1)]
    with open(tmp_path / "results.csv") as f:  # written right after the JSON: a kill between the two leaves it a row
        assert len(rows) - 1 <= len(list(csv.DictReader(f))) <= len(rows)  # behind, still a valid file


def test_out_folder_checks(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("[]")
    (tmp_path / "file.txt").write_text("x")
    for out, message in [(tmp_path / "done", "already holds a sweep"), (tmp_path / "file.txt", "is a file"),
                         (tmp_path / "file.txt" / "sub", "not a writable folder")]:
        with pytest.raises(ValueError, match=message):
            cmp.prepare_out(out)
    assert cmp.prepare_out(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_models_and_baselines():
    assert cmp.resolve_models(None, ["vit", "perceiver"]) == ("bixt_ti_l64_p16", "vit_ti_p16", "perceiver_ti")
    assert cmp.resolve_models(["bixt_ti_l64_p16s8"], ["vit_s_p16", "bixt-ablation"]) == (
        "bixt_ti_l64_p16s8", "vit_s_p16", "bixt_ti_iterative", "bixt_ti_sequential")
    with pytest.raises(ValueError, match="unknown baseline 'vitt'"):
        cmp.resolve_models(None, ["vitt"])
    assert join_list_values(["--baselines", "vit", "perceiver", "--seq-lens", "16", "64", "--quick"]) == [
        "--baselines", "vit,perceiver", "--seq-lens", "16,64", "--quick"]


@pytest.mark.parametrize("args,message", [
    (["--baselines", "transformer"], "unknown baseline 'transformer'"),
    (["--models", "bixt_ti_l64_p1"], "unknown model 'bixt_ti_l64_p1'"),
    (["--seq-lens", "256,1000"], "use 961 or 1024"),
    (["--seq-lens", "0"], "must be positive"),
    (["--seq-lens", "1k"], "comma-separated integers"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--budget-s", "0"], "--budget-s must be positive"),
    (["--backend", "xformers"], "CUDA only"),
    (["--mode", "all"], "unknown --mode"),
    (["--timing", "slow"], "unknown --timing 'slow'"),
])
def test_compare_cli_errors_are_one_line_and_write_nothing(args, message, tmp_path):
    out = tmp_path / "sweep"
    assert_one_line_error(runner.invoke(app, ["compare", "--seq-lens", "16", *args, "--out", str(out)]), message)
    assert not out.exists()


def test_compare_cli_unwritable_out_and_cuda(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    result = runner.invoke(app, ["compare", "--seq-lens", "16", "--out", str(tmp_path / "file.txt" / "sweep")])
    assert result.exit_code == 2 and "not a writable folder" in result.output
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["compare", "--seq-lens", "16", "--device", "cuda", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "CUDA is not available" in result.output and not (tmp_path / "c").exists()


@pytest.mark.parametrize("args,plan,total", [([], "full", None), (["--timing", "short"], "short", None),
                                             (["--quick"], "short", 150.0), (["--quick", "--timing", "full"], "full",
                                                                             150.0)])
def test_compare_cli_timing(args, plan, total, tmp_path, monkeypatch):
    """--timing short takes --quick's short warm-up and timing without its lengths and total budget."""
    from bixt.measure.profile import DEFAULT_PLAN, QUICK_PLAN

    seen = []
    monkeypatch.setattr(cmp, "run_sweep", lambda sweep, out, **kw: seen.append(sweep) or [])
    monkeypatch.setattr(cmp, "finish", lambda *a, **k: None, raising=False)
    runner.invoke(app, ["compare", "--seq-lens", "16", *args, "--out", str(tmp_path / "s")])
    assert len(seen) == 1
    assert seen[0].plan == {"full": DEFAULT_PLAN, "short": QUICK_PLAN}[plan] and seen[0].total_s == total
    assert seen[0].seq_lens == (16,)


@pytest.mark.slow
def test_compare_cli_runs_a_small_sweep(tmp_path, monkeypatch):
    """The real path (fvcore counts, fresh processes) at one short length; published counts are tested elsewhere."""
    monkeypatch.setattr(cmp, "published_counts", lambda **kwargs: [])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the fresh processes: no thread oversubscription on a busy machine
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["compare", "--baselines", "vit", "--seq-lens", "16", "--mode", "infer", "--quick",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["seq_len"]) for r in rows] == [("bixt_ti_l64_p16", 16), ("vit_ti_p16", 16)]
    assert rows[0]["macs_backend"] == "sdpa" and rows[0]["gmacs_executed"] > rows[0]["gmacs"]
    assert rows[1]["gmacs_executed"] == rows[1]["gmacs"]
    for r in rows:
        assert r["gmacs"] == pytest.approx(r["gmacs_analytic"], rel=0.02) and r["unsupported_ops"] == {}
        assert r["status"] == "ok" and r["infer_samples_per_sec"] > 0 and r["train_status"] == "not run"
    ratio = list(csv.DictReader(open(out / "ratios.csv")))
    assert float(ratio[0]["infer_speedup"]) == pytest.approx(rows[0]["infer_samples_per_sec"]
                                                             / rows[1]["infer_samples_per_sec"])
    assert "fitted exponents" in result.output and (out / "gmacs.png").exists()
