"""Every CUDA path: each attention backend in fp32/bf16/fp16, autocast training at the CLI, DDP over NCCL, and
`bixt profile` / `bixt compare` on the GPU (an out-of-memory configuration recorded as a row).

Runs where torch sees a GPU and is skipped elsewhere (CI has none): benchmarks/gpu/run.sh runs it on a lent GPU.
"""
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config
from typer.testing import CliRunner

from bixt.measure import compare as cmp
from bixt.measure.profile import QUICK_PLAN, Setup, measure, prepare
from bixt.nn.attention import BiDirectionalCrossAttention
from bixt_cli.main import app

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
runner = CliRunner()
CUDA_BACKENDS = ["math", "sdpa", "fused", "triton", "xformers", "auto"]
# Relative error (max |a - b| / max |b|) allowed against a float64 CPU reference, by dtype.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _skip_missing(backend: str, dtype: torch.dtype = torch.bfloat16) -> None:
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            pytest.skip("xformers is not installed")
        try:  # an installed build may lack kernels for this torch, GPU or dtype (README: "xformers")
            import xformers.ops as xops

            q = torch.zeros(1, 8, 1, 32, device="cuda", dtype=dtype)
            xops.memory_efficient_attention(q, q, q)
        except Exception as e:  # noqa: BLE001 -- any failure means: not usable here
            pytest.skip(f"xformers is installed but cannot run here: {type(e).__name__}: {str(e).splitlines()[0]}")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_bidirectional_attention_each_backend_and_dtype(backend, dtype):
    """Outputs and every parameter's gradient of one cross-attention, padding included, against float64 on CPU."""
    _skip_missing(backend, dtype)
    torch.manual_seed(0)
    ref = BiDirectionalCrossAttention(64, num_heads=2, backend="math").double()
    attn = BiDirectionalCrossAttention(64, num_heads=2, backend=backend)
    attn.load_state_dict(ref.state_dict())
    attn = attn.to("cuda", dtype)
    lat, tok = torch.randn(2, 16, 64, dtype=torch.float64), torch.randn(2, 300, 64, dtype=torch.float64)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[1, 200:] = True
    outs = attn(lat.to("cuda", dtype), tok.to("cuda", dtype), mask.cuda())
    ref_outs = ref(lat, tok, mask)
    g = [torch.randn_like(o) for o in ref_outs]
    sum((o * c.to(o)).sum() for o, c in zip(outs, g, strict=True)).backward()
    sum((o * c).sum() for o, c in zip(ref_outs, g, strict=True)).backward()
    for a, b in zip(outs, ref_outs, strict=True):
        assert rel_err(a, b) <= TOL[dtype]
    for (name, p), q in zip(attn.named_parameters(), ref.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) <= 2 * TOL[dtype], name


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_model_training_step_under_autocast(backend):
    """A BiXT's training step under bf16 autocast on each backend: the loss and gradients of fp32 math, within
    bf16's precision."""
    _skip_missing(backend)
    from bixt.models.bixt import BiXT

    torch.manual_seed(0)
    model = BiXT(tiny_config()).cuda()
    x = model.tokenizer.example_input(4, model.cfg.default_tokens, device="cuda")
    y = torch.arange(4, device="cuda") % 5
    results = {}
    for name, amp in (("ref", False), (backend, True)):
        model.set_backend("math" if name == "ref" else backend)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results[name] = (loss.detach().float(), [p.grad.float().clone() for p in model.parameters()])
    assert rel_err(results[backend][0], results["ref"][0]) <= 2e-2
    for a, b in zip(results[backend][1], results["ref"][1], strict=True):
        assert torch.isfinite(a).all() and rel_err(a, b) <= 0.15


def test_cli_train_amp_on_cuda(tmp_path):
    """`bixt train --amp --device cuda` on the default data (digits): trains, learns, saves finite weights."""
    result = runner.invoke(app, ["train", "--device", "cuda", "--amp", "--epochs", "5", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "r" / "metrics.csv").open()))
    assert len(rows) == 5 and float(rows[-1]["test_acc"]) >= 0.3, rows[-1]  # chance: 0.1; 0.58 seen after 5 epochs


@pytest.mark.slow
def test_ddp_over_nccl_equals_one_process(tmp_path):
    """torchrun with NCCL (one process per GPU; one GPU here) gives the weights a plain run gives."""
    args = ["train", "--device", "cuda", "--data", "shapes:points=32,train=64,test=32", "--epochs", "1",
            "--batch-size", "16", "--model-arg", "depth=2", "--model-arg", "dim=32", "--model-arg", "num_latents=8",
            "--model-arg", "heads=2", "--seed", "3"]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "bixt_cli.main", *args, "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "ddp" / "last.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-4


@pytest.mark.slow
def test_profile_on_cuda_json():
    result = runner.invoke(app, ["profile", "-m", "bixt_ti_l64_p16", "--device", "cuda", "--dtype", "bf16",
                                 "--seq-len", "4096", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["device"] == "cuda" and report["backend"] == "sdpa"  # bf16 inference: flash (attention.py)
    for mode in ("infer", "train"):
        assert report[f"{mode}_status"] == "ok", report[f"{mode}_message"]
        assert report[f"{mode}_peak_mem_mib"] > 0 and report[f"{mode}_step_ms"] > 0
    # The count (traced on the GPU) is the architecture's, the same as on the CPU.
    cpu = prepare(Setup("bixt_ti_l64_p16", 4096))
    from bixt.measure.profile import count

    assert report["gmacs"] == pytest.approx(count(cpu)["gmacs"], rel=1e-6)


@pytest.mark.slow
def test_compare_on_cuda_writes_every_row(tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "--device", "cuda", "--dtype", "bf16", "--baselines", "vit", "--seq-lens",
                                 "1024", "--timing", "short", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 and all(r["device"] == "cuda" and r["status"] == "ok" for r in rows), rows
    assert all(r["infer_status"] == "ok" for r in rows), [(r["model"], r["seq_len"], r["infer_message"]) for r in rows]


@pytest.mark.slow
def test_out_of_memory_is_a_recorded_status(tmp_path):
    """A ViT on the math backend at 2^18 tokens needs a 2^36-entry score matrix per head: the GPU runs out. The
    fresh process reports `oom`, and a sweep records the configuration as a row and goes on."""
    setup = Setup("vit_ti_p16", 1 << 18, 1, "cuda", "bf16", "math")
    result = measure(setup, "infer", QUICK_PLAN, timeout=300)
    assert result["status"] == "oom", result
    assert re.search("out of memory|OutOfMemory", result["message"], re.I)
    sweep = cmp.Sweep(models=("vit_ti_p16",), seq_lens=(1 << 18,), device="cuda", dtype="bf16", backend="math",
                      modes=("infer",), plan=QUICK_PLAN)
    rows = cmp.run_sweep(sweep, tmp_path / "sweep")
    assert rows[0]["status"] == "oom" or rows[0]["infer_status"] == "oom", rows[0]
    assert json.loads((tmp_path / "sweep" / "results.json").read_text())[0]["model"] == "vit_ti_p16"
