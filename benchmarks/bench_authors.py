"""BiXT-Ti/16 against the authors' formulation (benchmarks/authors_bixt.py), same weights, same input, same process
conditions: step time, peak memory, achieved GFLOP/s, and where this machine's limit lies. A benchmark, not a test.

    python benchmarks/bench_authors.py                 # 196 tokens (batch 32), 1,024, 4,096, 16,384 (batch 1)
    python benchmarks/bench_authors.py --lengths 196 --modes train --profile    # where the time goes, op by op
    python benchmarks/bench_authors.py --lengths 4096 --modes train --same-process   # each backend of ours, A/B

Runs: `authors` (their formulation, fp32), `ours` (this project's model, default backend, fp32), `ours_mkl` (ours
with its float32 Linears on MKL, torch's own, as the authors' are: what bixt.nn.linear's library choice is worth
here), `ours_bf16` (ours under bf16 autocast, as `--amp`), `ours_compile` (ours under torch.compile; compilation is
timed apart).
`infer` is a forward under inference_mode; `train` is forward, mean of the logits as loss, backward (no optimizer
step, which is the same code for both).

Every (run, length, mode) runs in a FRESH process, round-robin over the runs within each repeat, so a change in load
hits all runs alike; each process warms up (the first step is the memory step: peak RSS over the RSS before it,
`bixt.measure.memory.PeakMemory`), then times steps for `--target-s` seconds; the table gives the median over
`--repeats` processes of each process's median step. `--allocator` applies one glibc setting to every process
alike (bixt.nn.allocator: `tuned`, what bixt's commands use, or glibc's defaults). `gemm` rows measure the
machine's limit in the same way: an fp32 and a bf16 2048^3 matmul, and the Linear that dominates BiXT-Ti's cost (the
token MLP's 192 -> 768) on the run's B x N tokens, forward (+ backward in train); fp32 on MKL and on oneDNN, the
limit being the faster (torch's own matmul is MKL's, which on AMD processors is the slower).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from authors_bixt import AuthorsBiXT  # noqa: E402
from authors_table import table  # noqa: E402

from bixt.io.atomic import atomic_write  # noqa: E402
from bixt.measure.flops import analytic_macs  # noqa: E402
from bixt.measure.memory import PeakMemory  # noqa: E402
from bixt.models.official import bixt_to_official  # noqa: E402
from bixt.models.registry import create_model, get_entry  # noqa: E402
from bixt.nn import linear as bixt_linear  # noqa: E402
from bixt.nn.allocator import tune_allocator  # noqa: E402
from bixt.nn.autotune import cpu_model  # noqa: E402

RUNS = ("authors", "ours", "ours_mkl", "ours_bf16", "ours_compile")
MODEL = "bixt_ti_l64_p16"
console = Console(width=150)


def batch_for(tokens: int) -> int:
    return 32 if tokens <= 256 else 1  # ImageNet's 196 tokens are trained in batches; long inputs one at a time


def models(tokens: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and the authors', with the same weights, for a square grid of `tokens` /16 patches."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens is not a square grid of patches: use e.g. 196, 1024, 4096, 16384")
    torch.manual_seed(0)
    ours = create_model(MODEL, img_size=16 * side, drop_path_rate=0.0)
    theirs = AuthorsBiXT(img_size=16 * side)
    theirs.load_state_dict(bixt_to_official(ours.state_dict()), strict=True)
    return ours, theirs


def macs_per_sample(tokens: int) -> int:
    side = math.isqrt(tokens)
    cfg = get_entry(MODEL).config.replace(img_size=16 * side)
    return analytic_macs("bixt", cfg, tokens, "math").total


def step_fn(model: torch.nn.Module, x: torch.Tensor, mode: str, bf16: bool):
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else None

    def forward():
        if amp is None:
            return model(x)
        with amp:
            return model(x)

    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                forward()
        return step
    model.train()

    def step():
        forward().float().mean().backward()
        for p in model.parameters():
            p.grad = None
    return step


def time_steps(step, target_s: float) -> tuple[float, float, list[float]]:
    """(first step s, peak MiB of the first step, timed step seconds)."""
    with PeakMemory(torch.device("cpu")) as mem:
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
    warm = first
    while warm < 1.0:  # settle thread pools and allocator
        t0 = time.perf_counter()
        step()
        warm += time.perf_counter() - t0
    times: list[float] = []
    while len(times) < 3 or (sum(times) < target_s and len(times) < 50):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, mem.peak_mib, times


def _rate(fn, flops: int, target_s: float) -> float:
    _, _, times = time_steps(fn, target_s)
    return flops / statistics.median(times) / 1e9


def gemm_rates(tokens: int, mode: str, target_s: float) -> dict:
    """GFLOP/s of the machine's best case (2048^3) and of BiXT-Ti's dominant Linear on this run's tokens; float32
    on each Linear library (bixt.nn.linear: MKL, and oneDNN where this torch has it) and the better of them."""
    out = {}
    rows = batch_for(tokens) * tokens
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        libraries = bixt_linear.LIBRARIES if dtype == torch.float32 and bixt_linear.AVAILABLE else (None,)
        for library in libraries:
            key = tag if library is None else f"{tag}_{library}"
            with bixt_linear.using(library or "mkl"):  # bf16 products run on oneDNN in torch whatever this says
                a, w = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)

                def gemm(a=a, w=w):
                    with torch.inference_mode():
                        bixt_linear.linear(a, w)
                out[f"gemm2048_{key}_gflops"] = _rate(gemm, 2 * 2048 ** 3, target_s / 4)
                lin = bixt_linear.Linear(192, 768).to(dtype)
                x = torch.randn(rows, 192, dtype=dtype, requires_grad=mode == "train")

                def linear(lin=lin, x=x):
                    if mode == "infer":
                        with torch.inference_mode():
                            lin(x)
                    else:
                        lin(x).sum().backward()
                flops = 2 * rows * 192 * 768 * (3 if mode == "train" else 1)
                out[f"linear_{key}_gflops"] = _rate(linear, flops, target_s / 4)
        if libraries[0] is not None:  # the limit is the faster library's
            for what in ("gemm2048", "linear"):
                out[f"{what}_{tag}_gflops"] = max(out[f"{what}_{tag}_{lib}_gflops"] for lib in libraries)
    return out


def worker(job: dict) -> dict:
    if job["allocator"] == "tuned":
        tune_allocator()
    torch.set_num_threads(job["threads"])
    tokens, mode, run = job["tokens"], job["mode"], job["run"]
    if run == "ours_mkl":
        os.environ["BIXT_CPU_LINEAR"] = "mkl"  # a fresh process per run: nothing else sees it
    if run == "gemm":
        return gemm_rates(tokens, mode, job["target_s"])
    ours, theirs = models(tokens)
    model = theirs if run == "authors" else ours
    del ours, theirs  # the other model is freed before the memory baseline is taken
    compile_s = None
    if run == "ours_compile":
        model = torch.compile(model)
    x = torch.randn(batch_for(tokens), 3, 16 * math.isqrt(tokens), 16 * math.isqrt(tokens))
    step = step_fn(model, x, mode, bf16=run == "ours_bf16")
    if job.get("profile"):
        return profile_ops(step)
    first, peak, times = time_steps(step, job["target_s"])
    step_s = statistics.median(times)
    if run == "ours_compile":
        compile_s = first - step_s
    flops = 2 * macs_per_sample(tokens) * batch_for(tokens) * (3 if mode == "train" else 1)
    return {"step_s": step_s, "peak_mib": peak, "gflops": flops / step_s / 1e9, "iters": len(times),
            "compile_s": compile_s}


def profile_ops(step, top: int = 25) -> dict:
    """torch.profiler's per-op self CPU time over 3 steps (after 2 warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / 3, "calls": e.count // 3}
                    for e in rows[:top]],
            "total_ms": sum(e.self_cpu_time_total for e in rows) / 1e3 / 3}


def same_process(tokens: int, mode: str, repeats: int) -> dict[str, float]:
    """Median ms of the authors' step and of ours on each backend, on auto with its Linears on MKL, and on auto under
    bf16 autocast, all in this process, round-robin: differences smaller than the spread between fresh processes
    show here (both models live, so absolute times run higher)."""
    tune_allocator()
    ours, theirs = models(tokens)
    side = 16 * math.isqrt(tokens)
    x = torch.randn(batch_for(tokens), 3, side, side)
    # name: (model, backend, Linear library, bf16 autocast)
    runs = {"authors": (theirs, None, None, False), "ours_auto_mkl": (ours, "auto", "mkl", False),
            **{f"ours_{b}": (ours, b, None, False) for b in ("auto", "math", "sdpa", "fused")},
            "ours_bf16": (ours, "auto", None, True)}
    steps = {name: step_fn(model, x, mode, bf16=bf16) for name, (model, _, _, bf16) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats + 2):  # two warm-up rounds
        for name, (model, backend, library, _) in runs.items():
            if backend is not None:
                model.set_backend(backend)
            with bixt_linear.using(library) if library else contextlib.nullcontext():
                t0 = time.perf_counter()
                steps[name]()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run_fresh(job: dict) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(samples: list[dict]) -> dict:
    ok = [s for s in samples if "error" not in s]
    if not ok:
        return {"error": samples[-1]["error"]}
    out = {k: statistics.median(s[k] for s in ok) for k in ok[0] if ok[0][k] is not None}
    out["step_s_each"] = [s.get("step_s") for s in ok]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[196, 1024, 4096, 16384])
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--runs", nargs="+", default=["authors", "ours", "ours_mkl", "ours_bf16"],
                   choices=RUNS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--target-s", type=float, default=3.0, help="seconds of timed steps per process")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--allocator", choices=["tuned", "glibc"], default="tuned",
                   help="glibc's malloc in every process: bixt's setting (bixt.nn.allocator) or glibc's defaults")
    p.add_argument("--no-gemm", action="store_true", help="skip the machine-limit rows")
    p.add_argument("--profile", action="store_true", help="per-op breakdown (torch.profiler) instead of timing")
    p.add_argument("--same-process", action="store_true",
                   help="the authors' and ours on each backend in one process, round-robin (--repeats rounds)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.profile:
        return print_profiles(args)
    result = {"machine": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
                          "python": platform.python_version()}, "allocator": args.allocator,
              "command": " ".join(["python", "benchmarks/bench_authors.py", *sys.argv[1:]]), "rows": []}
    if args.same_process:
        for tokens in args.lengths:
            for mode in args.modes:
                ms = same_process(tokens, mode, max(args.repeats, 3))
                console.print(f"{tokens} x{batch_for(tokens)} {mode}, one process, median ms: "
                              + ", ".join(f"{k} {v:.0f} ({ms['authors'] / v:.2f}x)" for k, v in ms.items()))
                result["rows"].append({"tokens": tokens, "batch": batch_for(tokens), "mode": mode, "median_ms": ms})
                if args.out:
                    atomic_write(args.out, (json.dumps(result, indent=2) + "\n").encode())
        return
    for tokens in args.lengths:
        for mode in args.modes:
            runs = list(args.runs) + ([] if args.no_gemm else ["gemm"])
            samples: dict[str, list] = {r: [] for r in runs}
            for rep in range(args.repeats):
                for run in runs:
                    if run == "gemm" and rep:
                        continue  # the machine's limit: once per row is enough
                    console.print(f"[dim]{tokens} tokens {mode} {run} repeat {rep + 1}/{args.repeats}[/]")
                    samples[run].append(run_fresh({"tokens": tokens, "mode": mode, "run": run,
                                                   "threads": args.threads, "target_s": args.target_s,
                                                   "allocator": args.allocator}))
            row = {"tokens": tokens, "batch": batch_for(tokens), "mode": mode,
                   **{r: summarize(s) for r, s in samples.items()}}
            result["rows"].append(row)
            if args.out:  # written after every row: an interrupted run keeps what it finished
                atomic_write(args.out, (json.dumps(result, indent=2) + "\n").encode())
            print_row(row)
    print(table(result))  # the markdown of benchmarks/results/README.md


def print_row(row: dict) -> None:
    a = row.get("authors", {})
    bits = []
    for run in RUNS:
        r = row.get(run)
        if r and "step_s" in r and "step_s" in a:
            bits.append(f"{run} {r['step_s'] * 1e3:.0f} ms ({a['step_s'] / r['step_s']:.2f}x)")
    console.print(f"{row['tokens']} x{row['batch']} {row['mode']}: " + ", ".join(bits))


def print_profiles(args) -> None:
    for tokens in args.lengths:
        for mode in args.modes:
            for run in args.runs:
                res = run_fresh({"tokens": tokens, "mode": mode, "run": run, "threads": args.threads,
                                 "target_s": args.target_s, "allocator": args.allocator, "profile": True})
                if "error" in res:
                    console.print(f"{run}: {res['error']}")
                    continue
                t = Table(title=f"{run}, {tokens} tokens x{batch_for(tokens)}, {mode}: "
                                f"{res['total_ms']:.0f} ms of op time per step")
                for col in ("op", "self ms / step", "calls / step"):
                    t.add_column(col, justify="right" if col != "op" else "left")
                for op in res["ops"]:
                    t.add_row(op["op"], f"{op['self_ms']:.1f}", str(op["calls"]))
                console.print(t)


if __name__ == "__main__":
    main()
