"""Gradient checkpointing (timm's `set_grad_checkpointing`) and mixed precision (`--amp`): checkpointed training
gives the plain run's loss and gradients on every family and backend, saves far fewer activations, leaves inference
alone, and reaches the profiler's worker; `amp_dtype` refuses a CPU without bf16 in one line."""
import dataclasses

import pytest
import torch
from conftest import assert_one_line_error, tiny_config
from typer.testing import CliRunner

import bixt.models.base as base
import bixt.nn.fused as fused
import bixt.nn.precision as precision
from bixt import create_model
from bixt.measure import compare as cmp
from bixt.measure.profile import Plan, Setup, _worker, prepare, profile
from bixt.models.bixt import BiXT
from bixt.nn.precision import CPU_REFUSAL, amp_dtype
from bixt_cli.main import app

runner = CliRunner()
BACKENDS = ("math", "sdpa", "fused")
POINTS = dict(modality="points", in_chans=3, seq_len=40, fourier_bands=4, max_freq=8.0, num_classes=5)
# Dropout and drop-path on, so the recomputation must replay the RNG to give the same gradients.
NOISE = dict(drop_rate=0.1, drop_path_rate=0.3)
SMALL = {"bixt": lambda **kw: BiXT(tiny_config(**POINTS, **NOISE, **kw)),
         "vit": lambda **kw: create_model("vit_ti_points", dim=32, heads=2, depth=2, **POINTS, **NOISE, **kw),
         "perceiver": lambda **kw: create_model("perceiver_ti_points", dim=32, heads=2, cross_heads=2, attn_dim=32,
                                                num_latents=8, num_blocks=2, self_per_block=2, **POINTS, **NOISE,
                                                **kw)}
ONE_STEP = Plan(warmup_s=0.0, min_iters=1, max_iters=1, target_s=0.0)
TINY_OVERRIDES = (("dim", 32), ("heads", 2), ("depth", 2), ("num_latents", 8))


def small(family: str, backend: str) -> torch.nn.Module:
    model = SMALL[family](attn_backend=backend)
    with torch.no_grad():  # the "jax" init zeroes the head: every gradient below it would be zero, proving nothing
        model.head.weight.normal_(std=0.5)
    return model.train()


def inputs(batch: int = 3, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask[0, n // 2:] = True  # sample 0 padded after half its points
    return torch.randn(batch, n, 3, generator=g), mask


def loss_and_grads(model, x, mask, checkpointing: bool, seed: int = 1):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout and drop-path draws in both runs
    loss = model(x, padding_mask=mask).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(SMALL))
def test_checkpointed_training_gives_the_same_loss_and_gradients(family, backend, monkeypatch):
    monkeypatch.setattr(fused, "_MIN_TOKENS_PER_THREAD", 1)  # fused: several token ranges, the merge too
    model, (x, mask) = small(family, backend), inputs()
    loss, grads = loss_and_grads(model, x, mask, checkpointing=False)
    loss_ckpt, grads_ckpt = loss_and_grads(model, x, mask, checkpointing=True)
    # Bit-exact: the recomputation runs the same kernels on the same inputs with the same RNG state.
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=0, rtol=0, msg=name)
    assert sum(bool(g.abs().sum() > 0) for g in grads.values()) > 0.9 * len(grads)  # the comparison has teeth
    assert loss_and_grads(model, x, mask, checkpointing=True, seed=2)[0] != loss  # and the noise is live


def test_fused_autograd_function_runs_inside_the_checkpoint(monkeypatch):
    """The custom Function is recomputed in backward (its forward runs twice) and its gradients stay exact."""
    calls = []
    forward = fused.FusedBiDirectionalAttention.forward
    monkeypatch.setattr(fused.FusedBiDirectionalAttention, "forward",
                        staticmethod(lambda *a: calls.append(1) or forward(*a)))
    model, (x, mask) = small("bixt", "fused"), inputs()
    loss_and_grads(model, x, mask, checkpointing=False)
    plain = len(calls)
    loss_and_grads(model, x, mask, checkpointing=True)
    assert plain == model.cfg.depth and len(calls) - plain == 2 * plain


def test_checkpointing_acts_only_in_training_with_autograd(monkeypatch):
    calls = []
    monkeypatch.setattr(base, "checkpoint", lambda fn, *a, **k: calls.append(k) or fn(*a))
    model, (x, mask) = small("bixt", "sdpa"), inputs()
    assert model.grad_checkpointing is False
    assert model.set_grad_checkpointing() is model and model.grad_checkpointing is True
    with torch.no_grad():
        model(x, padding_mask=mask)
    model.eval()(x, padding_mask=mask)
    with torch.inference_mode():
        model(x, padding_mask=mask)
    assert calls == []
    model.train()(x, padding_mask=mask)
    assert calls == [{"use_reentrant": False, "preserve_rng_state": True}] * model.cfg.depth
    model.set_grad_checkpointing(False)(x, padding_mask=mask)
    assert len(calls) == model.cfg.depth


def test_eval_outputs_do_not_change_with_checkpointing():
    model, (x, mask) = small("bixt", "sdpa"), inputs()
    model.eval()
    with torch.no_grad():
        out = model(x, padding_mask=mask)
        torch.testing.assert_close(model.set_grad_checkpointing()(x, padding_mask=mask), out, atol=0, rtol=0)


def saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward after the forward (distinct storages, counted once). The inputs the
    checkpoints keep for their recomputation are not saved tensors: they are one (B, N, dim) stream per layer."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(storages.values())


def test_checkpointing_saves_far_fewer_activations():
    model = BiXT(tiny_config(modality="points", in_chans=3, seq_len=1024, depth=4)).train().set_backend("sdpa")
    x = torch.randn(1, 1024, 3)
    plain = saved_bytes(model.set_grad_checkpointing(False), x)
    ckpt = saved_bytes(model.set_grad_checkpointing(True), x)
    assert ckpt < 0.5 * plain, (ckpt, plain)


# ---- the profiler: --grad-checkpointing and --amp reach the worker --------------------------------------------


def worker_payload(setup: Setup) -> dict:
    """What `measure` sends the fresh process (the same JSON round trip)."""
    return {"setup": dataclasses.asdict(setup), "mode": "train", "plan": dataclasses.asdict(ONE_STEP)}


def test_profile_worker_checkpoints_the_train_step(monkeypatch):
    calls = []
    monkeypatch.setattr(base, "checkpoint", lambda fn, *a, **k: calls.append(1) or fn(*a))
    setup = Setup("bixt_ti_l64_p16", 16, overrides=TINY_OVERRIDES, backend="sdpa")
    assert _worker(worker_payload(setup))["status"] == "ok" and calls == []
    result = _worker(worker_payload(dataclasses.replace(setup, grad_checkpointing=True)))
    assert result["status"] == "ok" and len(calls) > 0, result


def test_profile_worker_runs_the_steps_under_autocast(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)  # autocast runs (emulated) on any CPU
    seen = []
    forward = BiXT.forward
    monkeypatch.setattr(BiXT, "forward", lambda self, *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or
                        forward(self, *a, **k))
    setup = Setup("bixt_ti_l64_p16", 16, overrides=TINY_OVERRIDES, backend="sdpa", amp=True)
    result = _worker(worker_payload(setup))
    assert result["status"] == "ok" and seen and all(seen), result
    seen.clear()
    _worker(worker_payload(dataclasses.replace(setup, amp=False)))
    assert seen and not any(seen)


def test_amp_setups_are_checked_before_anything_runs(monkeypatch):
    with pytest.raises(ValueError, match="pass one of --amp and --dtype"):
        prepare(Setup("bixt_ti_l64_p16", 16, dtype="bf16", amp=True))
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ValueError, match="needs bf16 support"):
        prepare(Setup("bixt_ti_l64_p16", 16, amp=True))


def test_cli_refuses_amp_on_a_cpu_without_bf16_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert_one_line_error(runner.invoke(app, ["profile", "--model", "bixt_ti_l64_p16", "--amp"]), "--amp on this CPU")
    assert_one_line_error(runner.invoke(app, ["compare", "--seq-lens", "16", "--amp", "--out", str(tmp_path / "c")]),
                          "--amp on this CPU")
    assert not (tmp_path / "c").exists()


def test_compare_passes_both_flags_to_every_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    seen = []
    monkeypatch.setattr(cmp, "run_sweep", lambda sweep, out, **kw: seen.append(sweep) or [])
    runner.invoke(app, ["compare", "--seq-lens", "16", "--grad-checkpointing", "--amp", "--out", str(tmp_path / "s")])
    assert len(seen) == 1 and seen[0].grad_checkpointing and seen[0].amp
    setup = seen[0].setup("vit_ti_p16", 16)
    assert setup.grad_checkpointing and setup.amp
    row = cmp.describe(prepare(setup))
    assert row["grad_checkpointing"] is True and row["amp"] is True
    assert {"grad_checkpointing", "amp"} <= set(cmp.COLUMNS)


@pytest.mark.slow  # a fresh process per mode
def test_profile_reports_grad_checkpointing_and_amp(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    amp = precision.cpu_supports_bf16()  # the worker is a fresh process: this machine's own answer holds there
    setup = Setup("bixt_ti_l64_p16", 16, overrides=TINY_OVERRIDES, grad_checkpointing=True, amp=amp)
    report = profile(setup, modes=("train",), plan=ONE_STEP)
    assert report["train_status"] == "ok" and report["grad_checkpointing"] is True and report["amp"] is amp, report


# ---- amp_dtype ------------------------------------------------------------------------------------------------


def test_amp_dtype_refuses_a_cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ValueError) as info:
        amp_dtype(torch.device("cpu"))
    assert str(info.value) == CPU_REFUSAL == ("--amp on this CPU needs bf16 support (AVX512-BF16 or AMX): run "
                                              "without --amp")
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert amp_dtype(torch.device("cpu")) == amp_dtype("cpu") == torch.bfloat16


def test_cpu_bf16_probe_needs_onednn(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert precision.cpu_supports_bf16() is False


@pytest.mark.parametrize("bf16,dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_dtype_on_cuda_is_bf16_where_the_gpu_has_it(bf16, dtype, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert amp_dtype(torch.device("cuda")) == dtype


def test_amp_dtype_refuses_other_devices():
    with pytest.raises(ValueError, match="not meta"):
        amp_dtype(torch.device("meta"))
