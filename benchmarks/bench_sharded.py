"""Token sharding on one machine: BiXT-Ti at 16,384 and 65,536 tokens on P = 1 and 2 processes (1 thread each),
through `bixt profile --shard-tokens P` under torchrun. Per process: peak memory of a training (and inference)
step, step time, bytes all-reduced per step and per layer. Prints the ratios the issue asks for (peak per process
at P = 2 over P = 1; the model's bytes per layer at both lengths) and writes everything to --out as it goes.

    python benchmarks/bench_sharded.py                      # ~6 min on 2 cores
    python benchmarks/bench_sharded.py --lengths 4096 --mode train --quick

Memory is peak RSS, and glibc's default malloc keeps freed blocks resident once its dynamic mmap threshold has
grown, so the figure then depends on the allocator's history as much as on the live tensors (the sharded process
allocates in a different order). The benchmark therefore fixes the threshold (MALLOC_MMAP_THRESHOLD_=131072: large
blocks are mapped and unmapped, RSS follows live memory) unless --glibc-default is given; both are committed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(model: str, seq_len: int, procs: int, mode: str, quick: bool, malloc: dict) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m",
           "bixt_cli.main", "profile", "-m", model, "--seq-len", str(seq_len), "--mode", mode, "--shard-tokens",
           str(procs), "--json", *(["--quick"] if quick else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **malloc}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return [{"seq_len": seq_len, "processes": procs, "status": "error", "message": tail[-1] if tail else ""}]
    return [{**row, "status": "ok"} for row in json.loads(proc.stdout.strip().splitlines()[-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bixt_ti_l64_p16")
    ap.add_argument("--lengths", default="16384,65536")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--mode", default="both", choices=("infer", "train", "both"))
    ap.add_argument("--quick", action="store_true", help="shorter timing (the default: bixt profile's)")
    ap.add_argument("--glibc-default", action="store_true", help="leave malloc's mmap threshold dynamic")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/sharded_cpu.json (sharded_cpu_glibc_default.json)")
    args = ap.parse_args()
    malloc = {} if args.glibc_default else {"MALLOC_MMAP_THRESHOLD_": "131072"}
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        "sharded_cpu_glibc_default.json" if args.glibc_default else "sharded_cpu.json")
    report = {"command": " ".join(["python", "benchmarks/bench_sharded.py", *sys.argv[1:]]),
              "torch": torch.__version__, "cpus": os.cpu_count(), "threads_per_process": 1, "malloc_env": malloc,
              "cpu": _cpu_name(),
              "date": time.strftime("%Y-%m-%d"), "rows": []}
    for n in map(int, args.lengths.split(",")):
        for p in map(int, args.procs.split(",")):
            t0 = time.perf_counter()
            rows = run(args.model, n, p, args.mode, args.quick, malloc)
            report["rows"] += [{**r, "model": args.model, "wall_s": round(time.perf_counter() - t0, 1)} for r in rows]
            args.out.write_text(json.dumps(report, indent=1))  # kept as it goes: an interrupted run keeps rows
            for r in rows:
                print(json.dumps({k: r.get(k) for k in ("seq_len", "processes", "rank", "mode", "tokens",
                                                         "peak_mem_mib", "step_ms", "model_comm_bytes_per_layer",
                                                         "comm_bytes_per_step", "status", "message")}), flush=True)
    report["summary"] = summary(report["rows"])
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        return "?"


def summary(rows: list[dict]) -> list[dict]:
    """Per length and mode: the largest per-process peak at each P over P = 1's, and the model's bytes per layer."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out = []
    for n in sorted({r["seq_len"] for r in ok}):
        for mode in ("infer", "train"):
            group = [r for r in ok if r["seq_len"] == n and r["mode"] == mode]
            one = [r for r in group if r["processes"] == 1]
            if not one:
                continue
            for p in sorted({r["processes"] for r in group} - {1}):
                many = [r for r in group if r["processes"] == p]
                peak = max(r["peak_mem_mib"] for r in many)
                out.append({"seq_len": n, "mode": mode, "processes": p, "peak_mib_per_process": peak,
                            "peak_mib_one_process": one[0]["peak_mem_mib"],
                            "peak_ratio": peak / one[0]["peak_mem_mib"],
                            "step_ms": max(r["step_ms"] for r in many), "step_ms_one_process": one[0]["step_ms"],
                            "model_comm_bytes_per_layer": many[0]["model_comm_bytes_per_layer"]})
    return out


if __name__ == "__main__":
    main()
