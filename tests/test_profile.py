"""Profiling: MAC handles against an independent count, closed forms against fvcore, published counts, memory
measurement, the fresh-process runs and `bixt profile`'s errors. Correctness only, never timing."""
import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error
from torch import nn
from typer.testing import CliRunner

from bixt.measure.flops import analytic_macs, count_macs
from bixt.measure.profile import (
    PeakMemory,
    Plan,
    Setup,
    _worker,
    count,
    is_oom,
    measure,
    prepare,
    profile,
    tokens_for,
)
from bixt.models import registry
from bixt.nn.attention import bidirectional_attention
from bixt.nn.fused import fused_bidirectional_attention
from bixt_cli.main import app

runner = CliRunner()
TINY = {"bixt": dict(dim=32, heads=2, depth=3, num_latents=8),
        "vit": dict(dim=32, heads=2, depth=2),
        "perceiver": dict(dim=32, heads=2, cross_heads=2, attn_dim=32, num_latents=8, num_blocks=3, self_per_block=2)}
ONE_STEP = Plan(warmup_s=0.0, min_iters=1, max_iters=1, target_s=0.0)


class Attend(nn.Module):
    """softmax(q k^T) v through SDPA or through plain matmuls (what fvcore counts without any handle)."""

    def __init__(self, use_sdpa: bool):
        super().__init__()
        self.use_sdpa = use_sdpa

    def forward(self, q, k, v, mask):
        if self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return ((q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(-1)) @ v


@pytest.mark.parametrize("batch", [(2, 3), (5,)])  # (B, H) and a 3-D call
def test_sdpa_handle_equals_matmul_count(batch):
    q, k, v = torch.randn(*batch, 7, 8), torch.randn(*batch, 11, 8), torch.randn(*batch, 11, 5)  # E != Ev, L != S
    mask = torch.rand(*batch, 7, 11) > 0.3
    mask[..., 0] = True
    sdpa, plain = count_macs(Attend(True), (q, k, v, mask)), count_macs(Attend(False), (q, k, v, mask))
    assert sdpa.by_operator == {"scaled_dot_product_attention": plain.total}
    assert sdpa.total == plain.total == torch.Size(batch).numel() * 7 * 11 * (8 + 5)
    assert sdpa.attention == sdpa.total and not sdpa.unsupported


class BiDir(nn.Module):
    def __init__(self, backend: str, two_sided: bool):
        super().__init__()
        self.backend, self.two_sided = backend, two_sided

    def forward(self, r_lat, v_lat, r_tok, v_tok, mask):
        v_lat = v_lat if self.two_sided else None
        if self.backend == "fused":
            lat, tok = fused_bidirectional_attention(r_lat, v_lat, r_tok, v_tok, 0.3, mask)
        else:
            lat, tok = bidirectional_attention(r_lat, v_lat, r_tok, v_tok, scale=0.3, padding_mask=mask,
                                               backend=self.backend)
        return lat if tok is None else (lat, tok)


@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_backends_counted_as_they_compute(two_sided, masked):
    """math builds the similarity once (3 products two-sided), sdpa once per direction (4), the fused Function once
    (its handle: 3); fvcore's matmul handle on the math backend is the independent reference."""
    B, H, M, N, d = 2, 3, 8, 40, 4
    args = (torch.randn(B, H, M, d), torch.randn(B, H, M, d), torch.randn(B, H, N, d), torch.randn(B, H, N, d),
            torch.rand(B, N) < 0.2 if masked else None)
    counts = {b: count_macs(BiDir(b, two_sided), args) for b in ("math", "sdpa", "fused")}
    unit = B * H * M * N * d
    assert counts["math"].total == counts["fused"].total == (3 if two_sided else 2) * unit
    assert counts["sdpa"].total == (4 if two_sided else 2) * unit
    assert all(c.attention == c.total and not c.unsupported for c in counts.values())


def test_bixt_backends_differ_by_one_similarity_per_two_sided_layer():
    cfg = dict(TINY["bixt"], attn_backend="math")
    math_model = registry.create_model("bixt_ti_l64_p16", **cfg)
    sdpa_model = registry.create_model("bixt_ti_l64_p16", **{**cfg, "attn_backend": "sdpa"})
    x = math_model.tokenizer.example_input(1, 64)
    diff = count_macs(sdpa_model, x).total - count_macs(math_model, x).total
    assert diff == (cfg["depth"] - 1) * cfg["num_latents"] * 64 * cfg["dim"]


CASES = [("bixt_ti_l64_p16", {}), ("bixt_ti_l64_p16s8", {}), ("bixt_ti_l64_points", {}), ("bixt_ti_l64_text", {}),
         ("bixt_ti_l64_p16", {"dense_classes": 3, "num_classes": 0}), ("bixt_ti_sequential", {}),
         ("bixt_ti_iterative", {}), ("vit_ti_p16", {}), ("vit_ti_text", {}), ("perceiver_ti", {}),
         ("perceiver_ti_points", {}), ("vit_ti_p16", {"dense_classes": 3, "num_classes": 0}),
         ("perceiver_ti", {"dense_classes": 3, "num_classes": 0}),
         ("perceiver_ti_points", {"dense_classes": 3, "num_classes": 0})]


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("name,extra", CASES)
def test_closed_form_matches_fvcore(name, extra, backend):
    entry = registry.get_entry(name)
    tiny = TINY["bixt" if entry.family.startswith("bixt") else entry.family]
    cfg = registry.model_config(name, **tiny, **extra, attn_backend=backend)
    model = entry.build(cfg)
    traced = count_macs(model, model.tokenizer.example_input(1, 64))
    closed = analytic_macs(entry.family, cfg, 64, backend)
    assert not traced.unsupported
    assert abs(closed.total / traced.total - 1) < 0.02
    assert abs(closed.attention / traced.attention - 1) < 0.02


def fused_length(batch: int = 1) -> int:
    """The shortest square length at which `auto` runs BiXT's cross-attention on the fused backend (CPU, fp32)."""
    from bixt.nn.fused import fused_wins

    cpu = torch.device("cpu")
    return next(s * s for s in range(1, 257) if fused_wins(cpu, torch.float32, batch * s * s, training=False))


@pytest.mark.parametrize("name", ["bixt_ti_l64_p16", "bixt_ti_iterative", "vit_ti_p16", "perceiver_ti"])
def test_closed_form_matches_fvcore_where_auto_picks_fused(name):
    """Where `auto` runs BiXT's cross-attention on the fused backend, prepare() says so, the trace (batch 1, the
    same backend) shows its op, and the closed form for that backend agrees."""
    family = registry.get_entry(name).family
    n = fused_length()
    prep = prepare(Setup(name, n, overrides=tuple(TINY["bixt" if family.startswith("bixt") else family].items())))
    model = prep.build(prep.count_backend)
    traced = count_macs(model, model.tokenizer.example_input(1, n))
    closed = analytic_macs(prep.family, prep.config, n, prep.count_backend)
    assert prep.backend == ("sdpa" if family == "vit" else "fused")
    assert ("PythonOp.FusedBiDirectionalAttention" in traced.by_operator) == (prep.backend == "fused")
    assert not traced.unsupported and abs(closed.total / traced.total - 1) < 0.02


def test_backend_follows_the_batch():
    """auto's choice depends on batch x tokens; the count (batch 1) uses the backend the batch runs on."""
    n = fused_length(batch=16)
    small, big = prepare(Setup("bixt_ti_l64_p16", n)), prepare(Setup("bixt_ti_l64_p16", n, batch_size=16))
    assert n < fused_length()  # the same length switches backend with the batch
    assert (small.backend, big.backend) == ("sdpa", "fused")
    assert big.count_backend == big.backend


@pytest.mark.parametrize("backend", ["math", "sdpa", "fused", "auto"])
def test_headline_gmacs_is_the_architectures_on_every_cpu_backend(backend):
    """The paper's 1.6795 GMACs (one similarity matrix) whatever runs; the executed count says what sdpa adds."""
    prep = prepare(Setup("bixt_ti_l64_p16", 196, backend=backend))
    macs = count(prep)
    assert round(macs["gmacs"], 4) == 1.6795 and round(macs["gmacs_analytic"], 4) == 1.6795
    assert macs["macs_backend"] == prep.count_backend
    if prep.count_backend == "sdpa":  # auto too, at 196 tokens on CPU
        assert macs["gmacs_executed"] > macs["gmacs"]
    else:
        assert macs["gmacs_executed"] == macs["gmacs"]
    assert macs["gmacs"] == pytest.approx(macs["gmacs_attention"] + macs["gmacs_rest"])
    assert not macs["unsupported_ops"]


@pytest.mark.parametrize("name,backend,traces", [("bixt_ti_l64_p16", "sdpa", 2), ("bixt_ti_l64_p16", "math", 1),
                                                 ("bixt_ti_l64_p16", "fused", 1), ("vit_ti_p16", "sdpa", 1),
                                                 ("perceiver_ti", "sdpa", 1), ("bixt_ti_sequential", "sdpa", 1)])
def test_count_traces_the_architecture_separately_only_where_the_backend_counts_otherwise(name, backend, traces,
                                                                                          monkeypatch):
    import bixt.measure.profile as prof

    family = registry.get_entry(name).family
    tiny = TINY["bixt" if family.startswith("bixt") else family]
    prep = prepare(Setup(name, 64, backend=backend, overrides=tuple(tiny.items())))
    calls = []
    monkeypatch.setattr(prof, "count_macs", lambda model, x: calls.append(model) or count_macs(model, x))
    macs = count(prep)
    assert len(calls) == prep.count_traces == traces
    cfg = registry.model_config(name, **tiny, attn_backend="math")
    math_model = registry.get_entry(name).build(cfg)
    assert round(macs["gmacs"] * 1e9) == count_macs(math_model, math_model.tokenizer.example_input(1, 64)).total
    assert round(macs["gmacs_analytic"] * 1e9) == analytic_macs(family, cfg, 64, "math").total
    assert (macs["gmacs_executed"] > macs["gmacs"]) == (traces == 2)


def test_measure_imports_no_training_data_or_cli_code():
    """bixt.measure sits below the CLI and beside training: it may use bixt.nn, bixt.models and bixt.io only."""
    root = Path(__file__).resolve().parents[1] / "bixt" / "measure"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("bixt.data", "bixt.train", "bixt_cli")), (path.name, name)
        assert "family ==" not in path.read_text(), path.name


def test_published_counts_within_one_percent():
    """fvcore on the cheap ones (the /8 and /4 grids take a while); the closed form, equal to fvcore wherever both
    are tested, on all of them."""
    from bixt.measure.compare import PUBLISHED, published_counts

    rows = published_counts(("bixt_ti_l64_p16", "vit_ti_p16"))
    assert len(rows) == 2
    for r in rows:
        assert abs(r["rel_err"]) < 0.01 and r["gmacs"] == pytest.approx(r["gmacs_analytic"], rel=1e-9), r
        assert r["param_count"] == r["published_params"], r
    for name, (gmacs, _) in PUBLISHED.items():
        entry = registry.get_entry(name)
        cfg = registry.model_config(name, attn_backend="math")
        closed = analytic_macs(entry.family, cfg, cfg.default_tokens, "math").total / 1e9
        assert abs(closed / gmacs - 1) < 0.01, (name, closed)


def test_uncounted_ops_are_listed_elementwise_ones_are_not():
    class Odd(nn.Module):
        def forward(self, x):
            return F.gelu(x).softmax(-1).cumsum(-1) + 1  # cumsum is real work fvcore does not count

    macs = count_macs(Odd(), torch.randn(2, 5))
    assert macs.total == 0 and macs.unsupported == {"aten::cumsum": 1}


def test_peak_memory_sees_what_a_block_allocates():
    with PeakMemory(torch.device("cpu")) as big:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    with PeakMemory(torch.device("cpu")) as small:
        y = torch.ones(16)
        del y
    assert 60 <= big.peak_mib < 100, big.peak_mib
    assert small.peak_mib < 16, small.peak_mib
    assert big.hwm_reset == big.method.startswith("peak RSS (VmHWM)")


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the fresh processes: no thread oversubscription on a busy machine


@pytest.mark.slow
def test_profile_runs_each_mode_in_a_fresh_process(one_thread):
    setup = Setup("bixt_ti_l64_p16", 16, batch_size=2, overrides=tuple(TINY["bixt"].items()))
    report = profile(setup, plan=ONE_STEP)
    for key in ("model", "seq_len", "batch_size", "device", "dtype", "backend", "torch_version", "param_count",
                "gmacs", "gmacs_analytic", "unsupported_ops", "infer_peak_mem_mib", "train_peak_mem_mib",
                "infer_samples_per_sec", "infer_tokens_per_sec", "train_samples_per_sec", "train_step_ms"):
        assert key in report, key
    assert report["infer_status"] == report["train_status"] == "ok", report
    assert report["backend"] == "sdpa" and report["param_count"] == registry.count_params(
        "bixt_ti_l64_p16", **TINY["bixt"])
    assert report["gmacs"] == pytest.approx(report["gmacs_analytic"], rel=0.02)
    assert report["gmacs"] == pytest.approx(report["gmacs_attention"] + report["gmacs_rest"])
    assert report["macs_backend"] == "sdpa" and report["gmacs_executed"] > report["gmacs"]
    assert report["infer_tokens_per_sec"] == pytest.approx(16 * report["infer_samples_per_sec"])
    assert report["train_peak_mem_mib"] > 0 and report["infer_peak_mem_mib"] > 0
    json.dumps(report)


@pytest.mark.slow  # measure() starts a process (stopped at once here)
def test_failures_inside_a_run_become_statuses(monkeypatch):
    import bixt.measure.profile as prof

    payload = {"setup": {**Setup("bixt_ti_l64_p16", 16).__dict__, "overrides": []}, "mode": "infer",
               "plan": ONE_STEP.__dict__}
    for exc, status in [(MemoryError(), "oom"), (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "oom"),
                        (RuntimeError("shape mismatch"), "error")]:
        def boom(*args, exc=exc):
            raise exc
        monkeypatch.setattr(prof, "run_mode", boom)
        assert _worker(payload)["status"] == status
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory")) and not is_oom(ValueError("out of memory"))
    assert measure(Setup("bixt_ti_l64_p16", 16), "infer", ONE_STEP, timeout=0.01)["status"] == "error"


def test_setup_errors_name_the_problem_and_the_fix(monkeypatch):
    for setup, message in [(Setup("bixt_ti_l64_p16", 200), "use 196 or 225"),
                           (Setup("bixt_ti_l64_p16", 0), "must be positive"),
                           (Setup("bixt_ti_l64_p16", 196, batch_size=0), "--batch-size must be positive"),
                           (Setup("bixt_ti_l64_p17", 196), "did you mean"),
                           (Setup("bixt_ti_l64_p16", 196, backend="xformers"), "CUDA only"),
                           (Setup("bixt_ti_l64_p16", 196, backend="flash"), "unknown attention backend"),
                           (Setup("bixt_ti_l64_p16", 196, dtype="fp8"), "unknown dtype")]:
        with pytest.raises(ValueError, match=message):
            prepare(setup)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        prepare(Setup("bixt_ti_l64_p16", 196, device="cuda"))
    entry = registry.get_entry("vit_ti_p16")  # a model whose config has no attention backend
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class NoBackend:
        modality: str = "image"
        default_tokens: int = 196

    monkeypatch.setitem(registry._REGISTRY, "no_backend", registry.Entry("no_backend", "test", NoBackend(),
                                                                         entry.build))
    with pytest.raises(ValueError, match="no attention backends"):
        prepare(Setup("no_backend", 196, backend="math"))


def test_tokens_from_image_size():
    assert tokens_for("bixt_ti_l64_p16") == 196 and tokens_for("bixt_ti_l64_p16s8", img_size=224) == 784
    for kwargs, message in [(dict(img_size=100), "use 96 or 112"), (dict(img_size=224, seq_len=100), "pass only one")]:
        with pytest.raises(ValueError, match=message):
            tokens_for("bixt_ti_l64_p16", **kwargs)
    with pytest.raises(ValueError, match="for image models"):
        tokens_for("bixt_ti_l64_text", img_size=224)


@pytest.mark.slow
def test_profile_cli_json(one_thread):
    result = runner.invoke(app, ["profile", "--model", "bixt_ti_l64_p16", "--seq-len", "16", "--mode", "infer",
                                 "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == "bixt_ti_l64_p16" and report["seq_len"] == 16 and report["img_size"] == 64
    assert report["infer_status"] == "ok" and report["train_status"] == "not run"
    assert report["gmacs"] == pytest.approx(report["gmacs_analytic"], rel=1e-6)
    assert report["macs_backend"] == "sdpa" and report["gmacs_executed"] > report["gmacs"]


@pytest.mark.slow
def test_profile_cli_model_args_change_the_model_and_its_token_grid(one_thread):
    args = ["profile", "--model", "bixt_ti_l64_p16", "--img-size", "64", "--mode", "infer", "--quick", "--json"]
    plain = json.loads(runner.invoke(app, args).stdout)
    result = runner.invoke(app, [*args, "--model-arg", "stride=8", "--model-arg", "depth=2"])
    assert result.exit_code == 0, result.output
    small = json.loads(result.stdout)
    assert (plain["seq_len"], small["seq_len"]) == (16, 64)  # the overridden stride sets the grid
    assert small["param_count"] < plain["param_count"] and small["infer_status"] == "ok"


@pytest.mark.parametrize("args,message", [
    (["--model-arg", "depth"], "--model-arg needs KEY=VALUE"),
    (["--model-arg", "colour=3"], "has no option colour"),
    (["--seq-len", "200"], "use 196 or 225"),
    (["--seq-len", "0"], "must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--backend", "xformers"], "CUDA only"),
    (["--mode", "eval"], "unknown --mode"),
    (["--img-size", "100"], "use 96 or 112"),
    (["--model", "nope"], "unknown model 'nope'"),
])
def test_profile_cli_errors_are_one_line(args, message, monkeypatch):
    base = [] if "--model" in args else ["--model", "bixt_ti_l64_p16"]
    assert_one_line_error(runner.invoke(app, ["profile", *base, *args]), message)


def test_profile_cli_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["profile", "--model", "bixt_ti_l64_p16", "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output
