"""Linears on oneDNN or MKL (bixt.nn.linear): the same values and gradients as F.linear in float64, either way."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from bixt.measure import tune as t
from bixt.nn import autotune
from bixt.nn import linear as L
from bixt.nn.layers import Mlp

needs_onednn = pytest.mark.skipif(not L.AVAILABLE, reason="this torch has no oneDNN")


def _inputs(rows: int, i: int = 24, o: int = 40, batch_dims: tuple = ()):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*batch_dims, rows, i, generator=g, requires_grad=True)
    w = (torch.randn(o, i, generator=g) / i ** 0.5).requires_grad_()
    b = torch.randn(o, generator=g, requires_grad=True)
    return x, w, b


def _reference(x, w, b, gelu):
    x64, w64, b64 = (v.detach().double().requires_grad_() for v in (x, w, b))
    y = F.linear(x64, w64, b64)
    return (F.gelu(y) if gelu else y), (x64, w64, b64)


@needs_onednn
@pytest.mark.parametrize("library", L.LIBRARIES)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("rows", [8, L.MIN_ROWS["train"]])  # below and at the threshold
def test_linear_matches_float64_in_values_and_gradients(library, gelu, rows):
    x, w, b = _inputs(rows // 2, batch_dims=(2,))  # (B, N, C) inputs, as the models give
    ref, leaves = _reference(x, w, b, gelu)
    with L.using(library):
        y = L.linear(x, w, b, gelu=gelu)
        cot = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), cot)
        with torch.inference_mode():
            y_infer = L.linear(x, w, b, gelu=gelu)
    ref_grads = torch.autograd.grad(ref, leaves, cot.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_infer.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_onednn_takes_large_products_only_and_never_under_autocast_or_tracing(monkeypatch):
    calls = []
    real = L.onednn_linear
    monkeypatch.setattr(L, "onednn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    with L.using("onednn"):
        big, w, b = _inputs(L.MIN_ROWS["train"])
        L.linear(big, w, b).sum().backward()
        assert len(calls) == 2  # the forward and the input's gradient
        small = _inputs(L.MIN_ROWS["train"] - 1)
        L.linear(*small)
        with torch.no_grad():
            L.linear(*_inputs(L.MIN_ROWS["infer"] - 1))
            assert len(calls) == 2
            L.linear(*_inputs(L.MIN_ROWS["infer"]))
            assert len(calls) == 3
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert L.linear(big, w, b).dtype == torch.bfloat16  # autocast's product, not a float32 one
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; fvcore still traces with it
                torch.jit.trace(L.Linear(24, 40), (big.detach(),), check_trace=False)
            L.linear(big.double(), w.double(), b.double())
        assert len(calls) == 3
    with L.using("mkl"), torch.no_grad():
        L.linear(big, w, b)
    assert len(calls) == 3


def test_the_library_comes_from_the_environment_then_the_cache_then_the_vendor(monkeypatch, tmp_path):
    monkeypatch.setenv("BIXT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BIXT_NO_TUNE_CACHE")
    monkeypatch.delenv("BIXT_CPU_LINEAR", raising=False)
    autotune.clear()
    try:
        assert L.cpu_library() == L.builtin_library()
        assert L.builtin_library() == ("onednn" if L.AVAILABLE and autotune.cpu_vendor() == "AuthenticAMD"
                                       else "mkl")
        other = "mkl" if L.builtin_library() == "onednn" else "onednn"
        autotune.store({True: ((1, 256, "sdpa"),), False: ((1, 256, "sdpa"),)}, "by hand", linear=other)
        assert json.loads((tmp_path / "tune.json").read_text())["machines"][autotune.machine_key()]["linear"] == other
        assert L.cpu_library() == (other if L.AVAILABLE else "mkl")
        monkeypatch.setenv("BIXT_CPU_LINEAR", "mkl")
        assert L.cpu_library() == "mkl"
        monkeypatch.setenv("BIXT_CPU_LINEAR", "blas")
        with pytest.raises(ValueError, match="BIXT_CPU_LINEAR='blas': use one of onednn, mkl"):
            L.cpu_library()
    finally:
        autotune.clear()
    with pytest.raises(ValueError, match="no Linear library"):
        with L.using("cublas"):
            pass


@needs_onednn
def test_tune_times_both_libraries_and_caches_the_faster(monkeypatch, tmp_path):
    times = t.time_linear(((64, 16, 32),), repeats=1)
    assert set(times) == set(L.LIBRARIES) and all(set(m) == {"train", "infer"} for m in times.values())
    assert all(s > 0 for m in times.values() for s in m.values())
    assert t.faster_linear({"onednn": {"train": 2.0, "infer": 1.0}, "mkl": {"train": 1.0, "infer": 1.5}}) == "mkl"
    monkeypatch.setenv("BIXT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BIXT_NO_TUNE_CACHE")
    monkeypatch.setattr(t, "time_linear", lambda shapes, repeats: {"onednn": {"train": 1.0, "infer": 1.0},
                                                                    "mkl": {"train": 2.0, "infer": 1.0}})
    autotune.clear()
    try:
        result = t.tune(lengths=((1, 64),), repeats=1, check_lengths=())
        assert result["linear"]["faster"] == "onednn" and autotune.linear_choice() == "onednn"
        t.tune(lengths=((1, 64),), repeats=1, check_lengths=(), linear_shapes=())  # not measured: kept
        assert autotune.linear_choice() == "onednn"
    finally:
        autotune.clear()


@needs_onednn
def test_mlp_is_the_same_on_either_library():
    mlp = Mlp(24, 96).eval()
    x = torch.randn(2, L.MIN_ROWS["train"] // 2, 24, requires_grad=True)
    outs = {}
    for library in L.LIBRARIES:
        with L.using(library):
            y = mlp(x)
            outs[library] = (y, *torch.autograd.grad(y.square().sum(), (x, mlp.fc1.weight)))
            with torch.inference_mode():
                outs[library + " infer"] = (mlp(x),)
    for a, b in zip(outs["onednn"], outs["mkl"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["onednn infer"][0], outs["mkl"][0].detach(), rtol=1e-5, atol=1e-5)
