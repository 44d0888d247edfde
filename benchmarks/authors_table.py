"""The tables of benchmarks/results/README.md from bench_authors.py's JSON files (a report, not a measurement).

    python benchmarks/authors_table.py benchmarks/results/authors_xeon_tuned.json [more files ...]

One markdown table per file: per token count and mode, each run's median step, its speed over the authors' run of
the same file, peak memory, achieved GFLOP/s and their share of the machine's rates (the 2048^3 GEMM's and the
dominant Linear's on the same tokens). `bound` is the authors' step over the time all of the model's FLOPs would
take at that Linear's rate: the speed-up a faster implementation of the same FLOPs could reach if everything ran
as fast as BiXT-Ti's biggest matmul does alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = ("authors", "ours", "ours_mkl", "ours_bf16", "ours_compile")


def table(result: dict) -> str:
    lines = [f"`{result['command']}` ({result['machine']['cpu']}, {result['machine']['threads']} threads, "
             f"torch {result['machine']['torch']}, {result['allocator']} allocator)", "",
             "| tokens | mode | batch | run | step ms | speed-up | peak MiB | GFLOP/s | of GEMM peak | of Linear | "
             "bound |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        a, g = row.get("authors", {}), row.get("gemm", {})
        for run in RUNS:
            r = row.get(run)
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {row['tokens']:,} | {row['mode']} | {row['batch']} | {run} | {r['error']} |"
                             " | | | | | |")
                continue
            tag = "bf16" if run.endswith("bf16") else "fp32"
            peak, lin = g.get(f"gemm2048_{tag}_gflops"), g.get(f"linear_{tag}_gflops")
            speed = f"{a['step_s'] / r['step_s']:.2f}x" if "step_s" in a else "-"
            bound = f"{lin / r['gflops']:.2f}x" if lin and run == "authors" else ""
            shares = f"{r['gflops'] / peak:.0%} | {r['gflops'] / lin:.0%}" if peak and lin else "- | -"
            name = run if r.get("compile_s") is None else f"{run} (compiled in {r['compile_s']:.0f} s)"
            lines.append(f"| {row['tokens']:,} | {row['mode']} | {row['batch']} | {name} | {r['step_s'] * 1e3:,.1f} | "
                         f"{speed} | {r['peak_mib']:,.0f} | {r['gflops']:.0f} | {shares} | {bound} |")
        if g:
            lines.append(f"| {row['tokens']:,} | {row['mode']} | {row['batch']} | machine | fp32 GEMM "
                         f"{g['gemm2048_fp32_gflops']:.0f}, bf16 GEMM {g['gemm2048_bf16_gflops']:.0f}; Linear fp32 "
                         f"{g['linear_fp32_gflops']:.0f}, bf16 {g['linear_bf16_gflops']:.0f} GFLOP/s"
                         f"{_libraries(g)} | | | | | | |")
    return "\n".join(lines)


def _libraries(g: dict) -> str:
    """The fp32 rates per Linear library, where the file has them (bench_authors.py from when oneDNN was measured)."""
    if "gemm2048_fp32_mkl_gflops" not in g:
        return ""
    return " (fp32 on MKL / oneDNN: GEMM {:.0f} / {:.0f}, Linear {:.0f} / {:.0f})".format(
        g["gemm2048_fp32_mkl_gflops"], g["gemm2048_fp32_onednn_gflops"], g["linear_fp32_mkl_gflops"],
        g["linear_fp32_onednn_gflops"])


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(json.loads(Path(path).read_text())) + "\n")
