"""Profiling one model at one input size: MACs (fvcore and closed form), peak memory and throughput.

What is measured, and how (BIXT-FACTS.md section 5 lists the traps this avoids):
- MACs: `bixt.measure.flops.count_macs` on CPU in float32 at batch 1 (MACs per sample, as published counts), with the
  attention handles. `gmacs` is the architecture's count in the paper's convention (one similarity matrix per
  layer: the `math` backend's count), whatever backend runs, so figures compare across backends and with published
  ones; `gmacs_analytic` is the family's closed form for it. `gmacs_executed` is the count of the computation that
  runs, on `macs_backend` (xformers, CUDA-only, is counted as sdpa: the same two calls); it exceeds `gmacs` where
  the backend builds BiXT's similarity matrix once per direction (sdpa, xformers) and equals it otherwise.
- Peak memory: each mode runs in a FRESH process (`python -m bixt.measure.profile`), so nothing another configuration
  allocated or cached is reused. Before a measured step, free heap is returned to the OS and the peak is reset;
  the figure is the step's peak over the memory in use just before it (`bixt.measure.memory.PeakMemory`). CPU:
  peak RSS (VmHWM, reset through /proc/self/clear_refs); CUDA: `max_memory_allocated` over `memory_allocated`.
  Two figures per mode: `*_peak_mem_mib`, the first step over the baseline right after model creation
  (activations and workspace plus every one-time cost: thread pools, kernel caches; training: also AdamW's two
  moments and the gradients), and `*_act_mem_mib`, the first timed step over the memory held between steps
  (activations and workspace; training: also the gradients): the part that grows with the input, the one to fit a
  scaling exponent to.
  Under --compile (`bixt.nn.compile.compile_model`, inductor) the model is compiled in the worker and its first
  step, which traces and compiles (training: the forward and the backward), is timed alone as `*_compile_s` and
  left out of everything else: the memory step is the next one, since compiling holds hundreds of MiB of host
  memory (dynamo's and inductor's structures, the loaded kernels) that would swamp a small model's activations on
  a CPU; so in training AdamW's moments, allocated by that first step, are not in `train_peak_mem_mib`.
- Throughput: the first step (the memory one) and further steps until `warmup_s` has passed are warm-up; then at
  least `min_iters` timed steps, more until `target_s` has passed (at most `max_iters`); the median step time, with
  device synchronisation. Short steps are timed many times; long ones (seconds) twice.
  A training step is forward, mean of the outputs as loss, backward, AdamW step.
Column names follow timm's benchmark.py (samples_per_sec, param_count, gmacs) except that step times say their unit
(`infer_step_ms`, `train_step_ms`; timm's `step_time` is also milliseconds) and `param_count` is exact, not millions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bixt.measure.flops import (
    ARCHITECTURE_BACKEND,
    MacCount,
    analytic_macs,
    count_macs,
    counts_like_math,
    has_two_sided_attention,
)
from bixt.measure.memory import PeakMemory, is_oom
from bixt.models.registry import get_entry, model_config
from bixt.nn.allocator import tune_allocator
from bixt.nn.attention import BiDirectionalCrossAttention, auto_bidirectional, check_backend, resolve_backend
from bixt.nn.compile import check_compile, compile_model
from bixt.nn.precision import amp_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("cpu", "cuda")
MODES = ("infer", "train")


@dataclasses.dataclass(frozen=True)
class Setup:
    """One configuration to measure. `backend` None: the model's own default. `overrides`: (field, value) pairs
    replacing config fields (e.g. a tiny model for tests). `grad_checkpointing`: training recomputes each layer's
    activations in backward (`Model.set_grad_checkpointing`). `amp`: the steps run under autocast (bf16; fp16 on a
    GPU without bf16) with fp32 weights, unlike `dtype`, which casts the weights. `compile`: the model runs
    torch.compile'd (inductor; the fused and triton attention kernels stay outside the graph)."""

    model: str
    seq_len: int
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    grad_checkpointing: bool = False
    amp: bool = False
    compile: bool = False

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls and attention run in: autocast's under --amp, else the weights'."""
        return amp_dtype(torch.device(self.device)) if self.amp else DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long to warm up and time each mode (see the module docstring)."""

    warmup_s: float = 1.0
    min_iters: int = 2  # two, so that `bixt profile` at 16k tokens (~9 s training steps on 2 cores) stays near 45 s
    max_iters: int = 20
    target_s: float = 3.0

    def steps(self, step_s: float) -> tuple[int, int]:
        """(warm-up steps, timed steps) the worker's loop takes when every step lasts step_s."""
        warm = max(1, math.ceil(self.warmup_s / step_s)) if step_s > 0 else 1
        timed = min(self.max_iters, max(self.min_iters, math.ceil(self.target_s / step_s))) if step_s > 0 else 1
        return warm, timed

    def more(self, times: list[float]) -> bool:
        """Whether to time another step after `times`."""
        return len(times) < self.min_iters or (sum(times) < self.target_s and len(times) < self.max_iters)


DEFAULT_PLAN = Plan()
QUICK_PLAN = Plan(warmup_s=0.3, min_iters=2, max_iters=10, target_s=0.5)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated setup: its registry entry, config (with the backend applied) and resolved backends."""

    setup: Setup
    family: str
    config: Any
    backend: str | None  # what runs on the device ("auto" resolved); None for a model without attention backends
    count_backend: str | None  # what `gmacs_executed` is counted on (CPU, batch 1): the same computation as `backend`
    param_count: int
    two_sided: bool = False  # holds a two-sided bi-directional attention, whose count depends on the backend

    @property
    def separate_count(self) -> bool:
        """Whether the executed count needs a trace of its own beside the architecture's (math) one."""
        return not counts_like_math(self.count_backend, self.two_sided)

    @property
    def count_traces(self) -> int:
        """fvcore traces `count` runs: what a time prediction of the count multiplies one forward by."""
        return 2 if self.separate_count else 1

    def build(self, backend: str | None = None) -> torch.nn.Module:
        cfg = self.config
        if backend is not None and hasattr(cfg, "attn_backend"):
            cfg = cfg.replace(attn_backend=backend)
        return get_entry(self.setup.model).build(cfg)


def _check_positive(value: int, what: str, fix: str) -> None:
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {value}: {fix}")


@functools.lru_cache(maxsize=512)  # a sweep asks again for each row; the answer depends on the setup alone
def prepare(setup: Setup) -> Prepared:
    """Validate a setup without running anything heavy; raises ValueError naming the problem and the fix."""
    _check_positive(setup.seq_len, "the sequence length", "pass a number of tokens >= 1")
    _check_positive(setup.batch_size, "--batch-size", "pass a batch size >= 1")
    if setup.device not in DEVICES:
        raise ValueError(f"unknown device {setup.device!r}: choose one of {', '.join(DEVICES)}")
    if setup.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available here (CPU-only torch or no GPU): use --device cpu")
    if setup.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {setup.dtype!r}: choose one of {', '.join(DTYPES)}")
    if setup.amp and setup.dtype != "fp32":
        raise ValueError(f"--amp keeps fp32 weights and autocasts the steps, but --dtype is {setup.dtype}: "
                         "pass one of --amp and --dtype")
    if setup.amp:
        amp_dtype(torch.device(setup.device))  # a CPU without bf16: refused here, before any process starts
    if setup.compile:
        check_compile(setup.device)  # no C++ compiler (CPU) or triton (CUDA): refused before any process starts
    entry = get_entry(setup.model)
    overrides = dict(setup.overrides)
    has_backends = "attn_backend" in {f.name for f in dataclasses.fields(entry.config)}
    if setup.backend is not None:
        if not has_backends:
            raise ValueError(f"{setup.model} has no attention backends to choose from: leave out --backend")
        overrides["attn_backend"] = check_backend(setup.backend)
    cfg = model_config(setup.model, **overrides)
    if input_bytes(setup, cfg) >= 2 ** 62:  # torch could not even describe the input (sizes are int64)
        raise ValueError(f"the sequence length {setup.seq_len} at batch {setup.batch_size} is far beyond any "
                         "machine's memory: use a shorter --seq-len")
    with torch.device("meta"):  # cheap: checks the input length (e.g. a square grid for images) without weights
        model = get_entry(setup.model).build(cfg)
        model.tokenizer.example_input(1, setup.seq_len, device="meta")
    backend = count_backend = None
    if has_backends:
        device, dtype = torch.device(setup.device), setup.compute_dtype
        backend = resolve_backend(cfg.attn_backend, device, dtype)
        if cfg.attn_backend == "auto" and any(isinstance(m, BiDirectionalCrossAttention) for m in model.modules()):
            # The backend of an inference forward, the pass GMACs count (train steps may switch at other lengths).
            backend = auto_bidirectional(device, dtype, setup.batch_size, setup.seq_len, training=False) or backend
        count_backend = "sdpa" if backend == "xformers" else backend  # xformers runs the same two calls as sdpa
    params = sum(p.numel() for p in model.parameters())
    return Prepared(setup, entry.family, cfg, backend, count_backend, params, has_two_sided_attention(model))


def input_bytes(setup: Setup, cfg) -> int:
    """A lower bound on the memory of one step: the larger of the raw input (images: every pixel of the grid) and
    the embedded tokens, at the setup's batch and dtype."""
    per_token = cfg.in_chans * cfg.stride ** 2 if cfg.modality == "image" else max(cfg.in_chans, 1)
    width = getattr(cfg, "token_dim", None) or cfg.dim
    return setup.batch_size * setup.seq_len * max(per_token, width) * DTYPES[setup.dtype].itemsize


def device_memory(device: str) -> int | None:
    """Total memory of the device in bytes (CPU: physical RAM), None where it cannot be read."""
    try:
        if device == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def check_fits(prep: Prepared) -> None:
    """Refuse a setup whose input alone exceeds the device's whole memory: it cannot run, and trying would leave
    the parent process (the count runs there) to the OOM killer rather than to a message."""
    s = prep.setup
    need, total = input_bytes(s, prep.config), device_memory(s.device)
    if total and need > total:
        raise ValueError(f"--seq-len {s.seq_len} at --batch-size {s.batch_size} needs {need / 2 ** 30:,.1f} GiB for "
                         f"the input alone, more than the {total / 2 ** 30:,.1f} GiB of this {s.device}: use a shorter "
                         "--seq-len or a smaller --batch-size")


def tokens_for(model: str, seq_len: int | None = None, img_size: int | None = None,
               overrides: dict | None = None) -> int:
    """The token count to profile at: --seq-len, or --img-size for an image model, or the model's default input
    (of its config with `overrides`)."""
    cfg = model_config(model, **(overrides or {}))
    if img_size is None:
        return cfg.default_tokens if seq_len is None else seq_len
    if cfg.modality != "image":
        raise ValueError(f"--img-size is for image models, and {model} reads {cfg.modality}: use --seq-len")
    _check_positive(img_size, "--img-size", f"pass an image side that is a multiple of {cfg.stride}")
    if img_size % cfg.stride:
        lo = img_size // cfg.stride * cfg.stride
        raise ValueError(f"--img-size {img_size} is not a multiple of {model}'s stride {cfg.stride}: use "
                         f"{lo or cfg.stride} or {lo + cfg.stride}")
    tokens = (img_size // cfg.stride) ** 2
    if seq_len is not None and seq_len != tokens:
        raise ValueError(f"--img-size {img_size} gives {tokens} tokens but --seq-len is {seq_len}: pass only one")
    return tokens


def trace(prep: Prepared, backend: str | None) -> MacCount:
    """fvcore's count of the prepared model on `backend`, at batch 1 and the setup's length (seeded weights), on
    the CPU in float32, or on the setup's GPU in its dtype."""
    torch.manual_seed(0)
    model = prep.build(backend)
    if prep.setup.device == "cpu":
        return count_macs(model, model.tokenizer.example_input(1, prep.setup.seq_len))
    # On a GPU the trace runs there, in the setup's dtype: the triton backend has no CPU kernels, and a CPU trace
    # of a ViT at 10^5 tokens would take longer than the whole sweep (counts do not depend on device or dtype).
    device, dtype = torch.device(prep.setup.device), DTYPES[prep.setup.dtype]
    model = model.to(device=device, dtype=dtype)
    try:
        return count_macs(model, model.tokenizer.example_input(1, prep.setup.seq_len, device=device, dtype=dtype))
    finally:
        del model
        torch.cuda.empty_cache()


def count(prep: Prepared) -> dict:
    """MACs per sample: the architecture's (fvcore with the attention handles, and the closed form, split attention /
    rest) and the executed backend's.

    One trace where the executed backend counts like math (math, fused, or a model without two-sided attention):
    tracing that backend rather than math also spares a ViT at long lengths math's N x N score matrix. Two where
    it does not (sdpa / xformers on BiXT)."""
    executed = trace(prep, prep.count_backend)
    arch = trace(prep, ARCHITECTURE_BACKEND) if prep.separate_count else executed
    closed = analytic_macs(prep.family, prep.config, prep.setup.seq_len, ARCHITECTURE_BACKEND)
    return {"gmacs": arch.total / 1e9, "gmacs_analytic": None if closed is None else closed.total / 1e9,
            "gmacs_attention": arch.attention / 1e9, "gmacs_rest": arch.rest / 1e9,
            "gmacs_executed": executed.total / 1e9, "macs_backend": prep.count_backend or "-",
            "unsupported_ops": {**executed.unsupported, **arch.unsupported}}


# ---------------------------------------------------------------------------------------------------------------
# Peak memory and timing, inside the fresh worker process.


def _autocast(device: torch.device, amp: bool):
    """Autocast in the amp dtype, or a no-op context without --amp (which must not ask for the amp dtype: a CPU
    without bf16 refuses it)."""
    return torch.autocast(device.type, dtype=amp_dtype(device)) if amp else contextlib.nullcontext()


def _step_fn(model: torch.nn.Module, x: torch.Tensor, mode: str, amp: bool = False):
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), _autocast(x.device, amp):
                model(x)
        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        # Backward outside autocast, as torch recommends: it runs each op in its forward's dtype anyway. No loss
        # scaler for fp16 (GPUs without bf16): its cost is a few elementwise ops, and underflow does not change time.
        with _autocast(x.device, amp):
            loss = model(x).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_step(step, device: torch.device) -> float:
    """Seconds `step()` takes, with the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run_mode(prep: Prepared, mode: str, plan: Plan) -> dict:
    """Peak memory of the first step, then the timed steps; meant to run in a fresh process (see `measure`)."""
    s = prep.setup
    # As `bixt train` does: memory reused for speed, handed back under checkpointing (bixt/nn/allocator.py).
    allocator = tune_allocator(lean=s.grad_checkpointing and mode == "train")
    device, dtype = torch.device(s.device), DTYPES[s.dtype]
    torch.manual_seed(0)
    model = prep.build(prep.backend).to(device=device, dtype=dtype)
    x = model.tokenizer.example_input(s.batch_size, s.seq_len, device=device, dtype=dtype)
    model.set_grad_checkpointing(s.grad_checkpointing)  # acts in training only: inference keeps no activations
    step = _step_fn(compile_model(model) if s.compile else model, x, mode, s.amp)

    def timed() -> float:
        return time_step(step, device)

    compile_s = timed() if s.compile else None  # compiling is lazy: the first step's time (see the docstring)
    with PeakMemory(device) as first:
        warm = timed()
    while warm < plan.warmup_s:
        warm += timed()
    with PeakMemory(device) as steady:  # the first timed step; the peak reset happens outside its timer
        times = [timed()]
    while plan.more(times):
        times.append(timed())
    step_s = statistics.median(times)
    return {"status": "ok", "message": "", "peak_mem_mib": first.peak_mib, "act_mem_mib": steady.peak_mib,
            "mem_method": first.method, "step_ms": step_s * 1e3, "samples_per_sec": s.batch_size / step_s,
            "tokens_per_sec": s.batch_size * s.seq_len / step_s, "iters": len(times), "compile_s": compile_s,
            "allocator": allocator}


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def failure(status: str, message: str) -> dict:
    return {"status": status, "message": message}


def fresh_python(module: str, payload: str) -> list[str]:
    """The command line of a worker: `python -m module payload` with this interpreter."""
    return [sys.executable, "-m", module, payload]


def fresh_env() -> dict[str, str]:
    """The environment of a worker: this checkout first on the path, so that it imports this very bixt."""
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}


def measure(setup: Setup, mode: str, plan: Plan = DEFAULT_PLAN, timeout: float | None = None) -> dict:
    """Run one mode (infer | train) of a setup in a fresh Python process; its result dict, never raising for
    OOM or errors inside the run (status oom / error with the message)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    payload = json.dumps({"setup": dataclasses.asdict(setup), "mode": mode, "plan": dataclasses.asdict(plan)})
    try:
        proc = subprocess.run(fresh_python("bixt.measure.profile", payload), capture_output=True, text=True,
                              timeout=timeout, env=fresh_env())
    except subprocess.TimeoutExpired:
        return failure("error", f"{mode}: timed out after {timeout:.0f} s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return worker_failure(proc.returncode, proc.stderr, f"{mode}: ")


def worker_failure(returncode: int, stderr: str, prefix: str = "") -> dict:
    """The failure of a worker process that printed no result: oom when it was SIGKILLed (on Linux, the kernel's
    OOM killer), else error with the last line it wrote to stderr."""
    if returncode in (-9, 137):
        return failure("oom", f"{prefix}killed by SIGKILL (out of memory)")
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return failure("error", f"{prefix}exit code {returncode}: {tail[-1] if tail else 'no output'}")


def _worker(payload: dict) -> dict:
    setup = Setup(**{**payload["setup"], "overrides": tuple(map(tuple, payload["setup"]["overrides"]))})
    try:
        return run_mode(prepare(setup), payload["mode"], Plan(**payload["plan"]))
    except Exception as e:  # noqa: BLE001 -- the parent records every failure as a row and goes on
        return failure("oom" if is_oom(e) else "error", f"{payload['mode']}: {type(e).__name__}: {_first_line(e)}")


# ---------------------------------------------------------------------------------------------------------------


def profile(setup: Setup, modes: tuple[str, ...] = MODES, plan: Plan = DEFAULT_PLAN,
            timeout: float | None = None) -> dict:
    """Everything `bixt profile` reports for one setup: one flat dict (see the module docstring for the keys)."""
    prep = prepare(setup)
    check_fits(prep)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown mode {', '.join(unknown)}: choose from {', '.join(MODES)}")
    report = describe(prep)
    report.update(count_status="ok", count_message="")
    try:
        report.update(count(prep))
    except Exception as e:  # the count runs in this process: an OOM there is a result (as a mode's), not a crash
        if not is_oom(e):
            raise
        closed = analytic_macs(prep.family, prep.config, setup.seq_len, ARCHITECTURE_BACKEND)
        report.update(dict.fromkeys(("gmacs", "gmacs_attention", "gmacs_rest", "gmacs_executed", "unsupported_ops")),
                      gmacs_analytic=None if closed is None else closed.total / 1e9,
                      macs_backend=prep.count_backend or "-", count_status="oom",
                      count_message=f"count: {type(e).__name__}: {_first_line(e)}")
    for mode in MODES:
        report.update(mode_columns(mode, measure(setup, mode, plan, timeout) if mode in modes else None))
    return report


def describe(prep: Prepared) -> dict:
    """The identifying columns of a report or a sweep row."""
    s = prep.setup
    cfg = prep.config
    return {"model": s.model, "family": prep.family, "seq_len": s.seq_len,
            "img_size": math.isqrt(s.seq_len) * cfg.stride if cfg.modality == "image" else None,
            "batch_size": s.batch_size, "device": s.device, "dtype": s.dtype, "amp": s.amp,
            "grad_checkpointing": s.grad_checkpointing, "compile": s.compile, "backend": prep.backend or "-",
            "torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "param_count": prep.param_count}


# A mode's result columns, each prefixed with the mode; compile_s is None without --compile.
MODE_KEYS = ("peak_mem_mib", "act_mem_mib", "samples_per_sec", "tokens_per_sec", "step_ms", "iters", "compile_s",
             "allocator")


def mode_columns(mode: str, result: dict | None) -> dict:
    """A mode's result as prefixed columns (`infer_step_ms`, ...); None: the mode was not run."""
    result = result or failure("not run", "")
    ok = result["status"] == "ok"
    cols = {f"{mode}_status": result["status"], f"{mode}_message": result.get("message", "")}
    for key in MODE_KEYS:
        cols[f"{mode}_{key}"] = result.get(key) if ok else None
    return cols


if __name__ == "__main__":  # the fresh process of `measure`: one JSON line on stdout
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
