"""--compile: a compiled BiXT computes what the eager one does (inductor, the default; the plumbing also on
aot_eager), the fused kernel stays out of the graph, `bixt train --compile` checkpoints the plain module and resumes,
`bixt profile --compile` times compiling apart from the steps, and what cannot compile is refused in one line."""
import json
import os
import shutil
import signal

import pytest
import torch
from conftest import assert_one_line_error, tiny_config
from test_train import TINY
from torch import nn
from typer.testing import CliRunner

import bixt.nn.compile as compile_mod
from bixt.io.checkpoint import read_state_dict
from bixt.measure.profile import prepare
from bixt.models.bixt import BiXT
from bixt.models.registry import create_model
from bixt.nn.compile import compile_model
from bixt.train import evaluate_checkpoint, resolve_config, rundir, train
from bixt_cli.main import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
NO_COMPILER = "install gcc/g++ or drop --compile"
# Inductor builds C++ kernels on a CPU; without a compiler `--compile` refuses in one line (tested below) and the tests
# of real inductor kernels cannot run.
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                               reason="inductor on a CPU needs a C++ compiler (g++ or $CXX)")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Models of one test do not count against the next one's recompile limit (past it, dynamo runs eagerly)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def plumbing(monkeypatch):
    """aot_eager: dynamo's graphs and AOTAutograd's forward and backward as inductor gets them, without generating and
    building C++ (seconds rather than a minute on a cold cache): for tests of the wiring, not of the kernels."""
    monkeypatch.setattr(compile_mod, "DEFAULT_BACKEND", "aot_eager")


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setattr(compile_mod, "_cpp_compiler", lambda: None)
    prepare.cache_clear()  # a setup checked before would not be checked again
    yield
    prepare.cache_clear()


def tiny_bixt(backend: str, depth: int = 2) -> BiXT:
    torch.manual_seed(0)
    model = BiXT(tiny_config(attn_backend=backend, depth=depth))
    nn.init.normal_(model.head.weight, std=0.02)  # the zero-initialised head would make outputs and gradients zero
    return model


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(x)
    out.square().sum().backward()
    params = getattr(model, "_orig_mod", model).named_parameters()
    grads = {name: p.grad.clone() for name, p in params}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@needs_cxx
@pytest.mark.parametrize("backend", ["math", "sdpa", "fused"])
def test_inductor_compiled_bixt_equals_eager(backend):
    model = tiny_bixt(backend, depth=1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = compile_model(model)(x)
    assert compiled_graphs() >= 1  # compiled indeed, not fallen back to eager
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@needs_cxx
def test_inductor_gradients_through_the_fused_kernel_equal_eager():
    """The fused autograd Function runs eagerly between compiled graphs, forward and backward."""
    model = tiny_bixt("fused", depth=1)
    x = torch.randn(2, 3, 32, 32)
    eager, eager_grads = forward_backward(model, x)
    out, grads = forward_backward(compile_model(model), x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, eager_grads, atol=1e-5, rtol=1e-4)


@needs_cxx
def test_inductor_fused_in_a_two_sided_bixt_ti_layer():
    """BiXT-Ti's widths: inductor hands the token projection's two halves to the eager fused kernel as tensors of
    their own, no longer views of one, and the kernel then takes their gradients apart (it refused them once)."""
    torch.manual_seed(0)
    model = create_model("bixt_ti_l64_p16", img_size=64, depth=2, attn_backend="fused", drop_path_rate=0.0)
    x = torch.randn(1, 3, 64, 64)
    eager, eager_grads = forward_backward(model, x)
    out, grads = forward_backward(compile_model(model), x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, eager_grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["math", "sdpa", "fused"])
def test_compiled_forward_and_backward_equal_eager(backend, plumbing):
    model = tiny_bixt(backend)
    x = torch.randn(2, 3, 32, 32)
    eager, eager_grads = forward_backward(model, x)
    out, grads = forward_backward(compile_model(model), x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, eager_grads, atol=1e-5, rtol=1e-5)


def test_the_fused_kernel_is_left_out_of_the_graph(plumbing, monkeypatch):
    import bixt.nn.fused as fused

    model = tiny_bixt("fused")
    compile_model(model)  # makes the kernel's disabled form, as any compile through bixt does
    x = torch.randn(2, 3, 32, 32)
    explained = torch._dynamo.explain(model)(x)
    reasons = {r.reason.splitlines()[0] for r in explained.break_reasons}
    assert reasons == {"Skip calling `torch.compiler.disable()`d function"}, reasons
    assert all("fused_bidirectional_attention" in r.reason for r in explained.break_reasons)
    calls = []  # the kernel's helpers run as Python, not traced: every call reaches them
    monkeypatch.setattr(fused, "chunk_size", lambda *a, f=fused.chunk_size: calls.append(1) or f(*a))
    compiled = compile_model(model)
    for _ in range(2):
        compiled(x)
    assert len(calls) == 2 * 2  # two two-sided attention layers, two calls


def test_train_compile_saves_the_plain_modules_keys_and_resumes(plumbing, tmp_path):
    run, keys = tmp_path / "run", []

    def ctrl_c(epoch, step, model):  # the hook gets the plain module: its keys are what a checkpoint must hold
        keys.append(set(model.state_dict()))
        if (epoch, step) == (1, 1):  # stops after the next step: two of the epoch's four are left
            os.kill(os.getpid(), signal.SIGINT)

    result = train({**TINY, "epochs": 2, "compile": True, "out": str(run)}, on_step=ctrl_c)
    assert (result.status, result.epochs_done) == ("interrupted", 1)
    assert result.compile_s > 0
    assert set(read_state_dict(run / rundir.LAST)) == set(read_state_dict(run / rundir.BEST)) == keys[0]
    assert not any(k.startswith("_orig_mod") for k in keys[0])
    result = runner.invoke(app, ["train", "--resume", str(run), "--compile"])  # loads the checkpoint, compiles again
    assert result.exit_code == 0, result.output
    assert "compile (first step)" in result.output
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["epochs_done"] == 2 and summary["compile_s"] > 0 and summary["samples_per_s"] > 0
    assert set(read_state_dict(run / rundir.LAST)) == keys[0]
    assert evaluate_checkpoint(run, device="cpu")["samples"] == 32  # an uncompiled model loads it strictly
    assert resolve_config({"compile": False}, resume=run).compile is False  # resume-free, as grad checkpointing


@needs_cxx
@pytest.mark.slow  # a fresh profiler process
def test_profile_compile_reports_compile_time_apart():
    """The real default (inductor) in profile's fresh worker: compile_s beside the step time, not in it."""
    args = ["profile", "--model", "bixt_ti_l64_p16", "--seq-len", "16", "--mode", "infer", "--quick", "--json",
            "--compile", *(f"--model-arg={k}={v}" for k, v in dict(dim=32, heads=2, depth=1, num_latents=8).items())]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["compile"] is True and report["infer_status"] == "ok", report
    assert report["infer_compile_s"] > 0 and report["infer_step_ms"] > 0
    assert report["infer_compile_s"] > report["infer_step_ms"] / 1e3  # compiling is not a step
    assert report["train_status"] == "not run" and report["train_compile_s"] is None


@pytest.mark.parametrize("args,message", [
    (["profile", "--model", "bixt_ti_l64_p16", "--compile", "--shard-tokens", "2"],
     "--compile does not run with --shard-tokens"),
    (["train", "--compile", "--shard-tokens", "2"], "--compile does not run with --shard-tokens 2"),
    (["compare", "--compile", "--data", "digits"], "--compile is one of the cost sweep's"),
])
def test_what_cannot_compile_is_refused_in_one_line(args, message):
    assert_one_line_error(runner.invoke(app, args), message)


@pytest.mark.parametrize("command", [["profile", "--model", "bixt_ti_l64_p16", "--seq-len", "16", "--compile"],
                                     ["compare", "--models", "bixt_ti_l64_p16", "--baselines", "vit_ti_p16",
                                      "--seq-lens", "16", "--compile"],
                                     ["train", "--compile", "--device", "cpu"]])
def test_compile_without_a_cpp_compiler_is_refused_in_one_line(command, no_compiler, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(runner.invoke(app, [*command, "--out", str(out)] if command[0] != "profile" else command),
                          NO_COMPILER)
    assert not out.exists()  # refused before anything was written
