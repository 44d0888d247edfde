"""Bi-directional attention backends head to head: time and peak memory of forward + backward, and BiXT-Ti forward
throughput at 16,384 tokens against the authors' formulation. A benchmark script, not a test.

    python benchmarks/bench_attention.py                      # N=65,536, M=64, H=6, d_h=32, batch 1, fp32
    python benchmarks/bench_attention.py --tokens 16384 --skip-model --out /tmp/small.json
    python benchmarks/bench_attention.py --crossover    # fused vs sdpa from 256 to 65,536 tokens: where auto switches

Every backend runs in the same process, round-robin (repeat 1 of each, then repeat 2, ...), so a change in the
machine's load hits all of them alike; medians are reported. Peak memory is measured in a fresh subprocess per
backend (`bixt.measure.memory.PeakMemory`, the profiler's probe): the peak resident set (VmHWM, reset through
/proc/self/clear_refs; ru_maxrss where that is not possible) minus the resident set just before the call, with
inputs and cotangents already allocated.

`kept MB` is what a forward keeps for its backward beyond its inputs, parameters and outputs (saved-tensor hooks):
the memory a training network holds per attention layer until its backward pass.

Two levels: `core` is bidirectional_attention() on (B, H, L, d) tensors (what the backends differ in); `module` is
BiDirectionalCrossAttention (projections, head split/merge) on (B, L, dim) inputs. `floor_mb` is what any backend
must hold at the core level: the token output and the gradients of R_tok and V_tok.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bixt.io.atomic import atomic_write
from bixt.measure.memory import PeakMemory
from bixt.nn.attention import BiDirectionalCrossAttention, bidirectional_attention

BACKENDS = ("math", "sdpa", "fused")
console = Console()


def core_inputs(B, H, M, N, d):
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(B, H, L, d, generator=g, requires_grad=True) for L in (M, M, N, N)]
    return x, [torch.randn(B, H, M, d, generator=g), torch.randn(B, H, N, d, generator=g)]


def module_inputs(B, H, M, N, d):
    torch.manual_seed(0)
    attn = BiDirectionalCrossAttention(H * d, num_heads=H)
    lat, tok = torch.randn(B, M, H * d, requires_grad=True), torch.randn(B, N, H * d, requires_grad=True)
    return attn, [lat, tok], [torch.randn(B, M, H * d), torch.randn(B, N, H * d)]


def make_step(level, backend, shape):
    """A closure running forward + backward once; returns (forward seconds, total seconds)."""
    run, wrt, cot = make_step_inputs(level, backend, shape)

    def step():
        t0 = time.perf_counter()
        out = run()
        t1 = time.perf_counter()
        torch.autograd.grad(out, wrt, cot)
        return t1 - t0, time.perf_counter() - t0
    return step


def kept_for_backward(level: str, backend: str, shape) -> float:
    """MB that a forward keeps for its backward beyond its inputs, parameters and outputs: what a training network
    holds per attention layer until the backward pass. Counted through saved-tensor hooks, one storage once."""
    run, owned, _ = make_step_inputs(level, backend, shape)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    for t in [*owned, *out]:
        kept.pop(t.untyped_storage().data_ptr(), None)
    return sum(kept.values()) / 2**20


def make_step_inputs(level, backend, shape):
    """(run, inputs to differentiate, cotangents) for one level and backend."""
    if level == "core":
        x, cot = core_inputs(*shape)
        return (lambda: bidirectional_attention(*x, backend=backend)), x, cot
    attn, x, cot = module_inputs(*shape)
    attn.backend = backend
    return (lambda: attn(*x)), [*x, *attn.parameters()], cot


def make_infer_step(level, backend, shape):
    """A closure running one inference-mode forward; returns (seconds,)."""
    run, _, _ = make_step_inputs(level, backend, shape)

    def step():
        t0 = time.perf_counter()
        with torch.inference_mode():
            run()
        return (time.perf_counter() - t0,)
    return step


def child_memory(level: str, backend: str, shape) -> dict:
    """Run in a fresh process: peak resident memory of one forward + backward above the pre-call baseline."""
    B, H, M, N, d = shape
    make_step(level, backend, (1, H, M, 256, d))()  # load the libraries' code and thread pools on a tiny problem
    step = make_step(level, backend, shape)
    with PeakMemory(torch.device("cpu")) as mem:
        step()
    return {"peak_mb": mem.peak_mib, "hwm_reset": mem.hwm_reset}


def measure_memory(level: str, backend: str, shape) -> dict:
    cmd = [sys.executable, __file__, "--child", level, backend, "--shape", *map(str, shape)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gemm_rate(n: int = 4096, repeats: int = 7) -> float:
    """This machine's fp32 matmul rate, GMAC/s (median of `repeats` n x n x n products)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return n**3 / statistics.median(times) / 1e9


def _no_attention(r_lat, v_lat, r_tok, v_tok, **kw):
    """A zero-cost stand-in for the bi-directional attention core (outputs allocated and zeroed, as any backend
    must): the model's time with it bounds what any cross-attention backend can reach."""
    B, H, N, d = r_tok.shape
    tok = None if v_lat is None else r_tok.new_zeros(B, N, H, d).transpose(1, 2)
    return torch.zeros_like(r_lat), tok


MODEL_RUNS = ("authors", "math", "sdpa", "fused", "no_attention")


def child_model_time(name: str, img: int, run: str, iters: int) -> dict:
    """In a fresh process: median forward time of one model run after one warm-up forward.

    authors: their formulation end to end (math backend, whole-sequence token MLPs); math/sdpa/fused: ours (token
    MLPs streamed in cache-sized chunks); no_attention: the cross-attention core replaced by zeros, the bound for
    any cross-attention backend. A fresh process per run keeps allocator state from favouring whoever runs later.
    """
    import bixt.nn.attention
    import bixt.nn.layers
    from bixt import create_model

    if run == "no_attention":
        bixt.nn.attention.bidirectional_attention = _no_attention
    if run == "authors":
        bixt.nn.layers.TOKEN_CHUNK = 10**12
    torch.manual_seed(0)
    model = create_model(name, img_size=img).eval()
    model.set_backend({"no_attention": "sdpa", "authors": "math"}.get(run, run))
    x = torch.randn(1, 3, img, img)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "all": times}


def model_benchmark(name: str, img: int, repeats: int, iters: int = 3) -> dict:
    from bixt import create_model
    from bixt.measure.flops import ARCHITECTURE_BACKEND, count_macs

    model = create_model(name, img_size=img).eval()
    x = torch.randn(1, 3, img, img)
    # The architecture's count (one similarity matrix, as on the authors' model), as `bixt profile`'s gmacs.
    macs = count_macs(model.set_backend(ARCHITECTURE_BACKEND), x).total
    tokens = (img // model.cfg.stride) ** 2
    del model
    times = {b: [] for b in MODEL_RUNS}
    for r in range(repeats):  # round-robin, so a change in the machine's load hits every run alike
        for b in MODEL_RUNS:
            cmd = [sys.executable, __file__, "--model-child", name, str(img), b, str(iters)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            times[b].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
            console.log(f"model {name} @ {img}px, repeat {r + 1}/{repeats}, {b}: {times[b][-1]:.2f} s")
    return {"name": name, "img_size": img, "tokens": tokens, "gmacs": macs / 1e9,
            "seconds": {b: statistics.median(t) for b, t in times.items()}, "all_seconds": times}


CROSSOVER = ((1, 256), (1, 1024), (8, 196), (1, 2304), (4, 1024), (1, 4096), (2, 4096), (1, 8192), (16, 576),
             (1, 12288), (1, 16384), (8, 3136), (1, 65536))


def crossover(H: int, M: int, d: int, repeats: int, out: Path) -> dict:
    """fused / sdpa time for (batch, tokens) pairs, inference forward and forward + backward: the data behind
    `bixt.nn.fused.fused_wins`. Medians of `repeats` round-robin calls; written after every shape."""
    rows = []
    for B, N in CROSSOVER:
        row = {"batch": B, "tokens": N, "batch_tokens": B * N}
        for level in ("infer", "train"):
            steps = {b: (make_step if level == "train" else make_infer_step)("core", b, (B, H, M, N, d))
                     for b in ("sdpa", "fused")}
            for step in steps.values():
                step()  # warm-up
            times = {b: [] for b in steps}
            for _ in range(repeats):
                for b, step in steps.items():
                    times[b].append(step()[-1])
            med = {b: statistics.median(t) for b, t in times.items()}
            row[level] = {"sdpa_ms": med["sdpa"] * 1e3, "fused_ms": med["fused"] * 1e3,
                          "fused_over_sdpa": med["fused"] / med["sdpa"]}
        rows.append(row)
        console.log(f"{B} x {N}: fused/sdpa infer {row['infer']['fused_over_sdpa']:.2f}, "
                    f"train {row['train']['fused_over_sdpa']:.2f}")
        write_json(out, {"heads": H, "latents": M, "head_dim": d, "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "rows": rows})
    return rows


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2).encode())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--latents", type=int, default=64)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model", default="bixt_ti_l64_p16")
    p.add_argument("--model-img", type=int, default=2048, help="image side; 2048 px = 16,384 tokens at /16")
    p.add_argument("--model-repeats", type=int, default=3)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--levels", nargs="+", default=["core", "module"], choices=["core", "module"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_attention.json"))
    p.add_argument("--crossover", action="store_true", help="fused vs sdpa over batch x tokens (auto's switch)")
    p.add_argument("--child", nargs=2, metavar=("LEVEL", "BACKEND"), help=argparse.SUPPRESS)
    p.add_argument("--shape", nargs=5, type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model_child:
        name, img, run, iters = args.model_child
        print(json.dumps(child_model_time(name, int(img), run, int(iters))))
        return
    if args.child:
        print(json.dumps(child_memory(*args.child, tuple(args.shape))))
        return
    if args.crossover:
        out = args.out if args.out != p.get_default("out") else Path("benchmarks/results/crossover.json")
        rows = crossover(args.heads, args.latents, args.head_dim, args.repeats, out)
        t = Table(title=f"fused / sdpa time, H={args.heads}, M={args.latents}, d_h={args.head_dim}")
        for col in ("batch x tokens", "infer sdpa ms", "infer fused ms", "infer ratio", "train sdpa ms",
                    "train fused ms", "train ratio"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(f"{r['batch']} x {r['tokens']}", *(f"{r[lv][k]:.2f}" for lv in ("infer", "train")
                                                          for k in ("sdpa_ms", "fused_ms", "fused_over_sdpa")))
        console.print(t)
        console.print(f"written {out}")
        return
    shape = (args.batch, args.heads, args.latents, args.tokens, args.head_dim)
    B, H, M, N, d = shape
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "loadavg_start": os.getloadavg()},
              "shape": dict(zip(("batch", "heads", "latents", "tokens", "head_dim"), shape, strict=True)),
              "floor_mb": 3 * B * H * N * d * 4 / 2**20, "levels": {}}
    result["machine"]["gemm_gmacs"] = gemm_rate()
    console.log(f"fp32 GEMM rate: {result['machine']['gemm_gmacs']:.1f} GMAC/s")
    for level in args.levels:
        steps = {b: make_step(level, b, shape) for b in BACKENDS}
        for step in steps.values():
            step()  # warm-up
        times = {b: [] for b in BACKENDS}
        for r in range(args.repeats):
            for b in BACKENDS:
                times[b].append(steps[b]())
            console.log(f"{level}: repeat {r + 1}/{args.repeats}: " +
                        ", ".join(f"{b} {times[b][-1][1] * 1e3:.0f} ms" for b in BACKENDS))
        del steps
        mem = {b: {**measure_memory(level, b, shape), "kept_mb": kept_for_backward(level, b, shape)}
               for b in BACKENDS}
        result["levels"][level] = {
            b: {"fwd_ms": statistics.median(t[0] for t in times[b]) * 1e3,
                "fwd_bwd_ms": statistics.median(t[1] for t in times[b]) * 1e3,
                "all_fwd_bwd_ms": [t[1] * 1e3 for t in times[b]], **mem[b]} for b in BACKENDS}
        write_json(args.out, result)
    if not args.skip_model:
        result["model"] = model_benchmark(args.model, args.model_img, args.model_repeats)
        secs = result["model"]["seconds"]
        result["model"]["best_ours"] = min(BACKENDS, key=secs.get)
        result["model"]["best_ours_vs_authors"] = secs["authors"] / secs[result["model"]["best_ours"]]
        # The machine's rate: the best of the measurements before and after (load only lowers it).
        result["machine"]["gemm_gmacs"] = max(result["machine"]["gemm_gmacs"], gemm_rate())
        write_json(args.out, result)
    result["machine"]["loadavg_end"] = os.getloadavg()
    write_json(args.out, result)
    report(result)
    console.print(f"written {args.out}")


def report(result: dict) -> None:
    fl = result["floor_mb"]
    for level, rows in result["levels"].items():
        t = Table(title=f"{level}: forward + backward, shape {result['shape']}  (floor {fl:.0f} MB at core level)")
        for col in ("backend", "fwd ms", "fwd+bwd ms", "peak MB", "time / math", "time / sdpa", "math peak / peak",
                    "math extra / extra", "kept MB", "math kept / kept"):
            t.add_column(col, justify="right")
        m, s = rows["math"], rows["sdpa"]
        for b, r in rows.items():
            extra = (m["peak_mb"] - fl) / max(r["peak_mb"] - fl, 1e-9) if level == "core" else float("nan")
            t.add_row(b, f"{r['fwd_ms']:.0f}", f"{r['fwd_bwd_ms']:.0f}", f"{r['peak_mb']:.0f}",
                      f"{r['fwd_bwd_ms'] / m['fwd_bwd_ms']:.2f}", f"{r['fwd_bwd_ms'] / s['fwd_bwd_ms']:.2f}",
                      f"{m['peak_mb'] / r['peak_mb']:.1f}x", f"{extra:.1f}x", f"{r['kept_mb']:.1f}",
                      f"{m['kept_mb'] / max(r['kept_mb'], 1e-9):.0f}x")
        console.print(t)
    if "model" in result:
        mo, rate = result["model"], result["machine"]["gemm_gmacs"]
        t = Table(title=f"{mo['name']} forward, {mo['tokens']} tokens ({mo['img_size']} px), {mo['gmacs']:.1f} GMACs")
        for col in ("run", "seconds", "images/s", "throughput / authors", "fraction of GEMM rate"):
            t.add_column(col, justify="right")
        for b, sec in mo["seconds"].items():
            t.add_row(b, f"{sec:.2f}", f"{1 / sec:.3f}", f"{mo['seconds']['authors'] / sec:.2f}x",
                      f"{mo['gmacs'] / sec / rate:.0%}")
        console.print(t)
        console.print(f"best of ours: {mo['best_ours']}, {mo['best_ours_vs_authors']:.2f}x the authors' formulation "
                      "(authors: math backend and whole-sequence token MLPs; math/sdpa/fused: ours, token MLPs in "
                      "cache-sized chunks); no_attention: the cross-attention core replaced by zeros, the bound for "
                      f"any cross-attention backend. GEMM rate {rate:.1f} GMAC/s.")


if __name__ == "__main__":
    main()
