"""The triton backend on a GPU: kernel time against two flash-SDPA calls, its share of the copy bandwidth, where
`auto` should switch to it, and BiXT-Ti/16's training throughput against the authors' formulation. Not a test.

    python benchmarks/bench_triton.py --out benchmarks/results/triton_h200.json      # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/bench_triton.py --smoke --out /tmp/smoke.json   # CPU: code paths only

Sections, each written to --out as soon as it finishes:
- `copy`: device-to-device copy of 2 GiB, bytes read + written per second: the bandwidth ceiling.
- `kernel`: B=1, H=6, M=64, d=32, bf16 at N = 65,536 and 1,048,576: forward and forward + backward of
  `bidirectional_attention` on triton and on sdpa restricted to flash (two one-way calls). `fwd_bytes` is what the
  forward must move at least (read R_tok, V_tok; write the token update and its log-sum-exp, which the backward
  needs), and `fwd_share_of_copy` that traffic's rate over the copy bandwidth.
- `configs`: each candidate (tokens per block, warps) of the kernels at both lengths: what FORWARD_CONFIG and
  BACKWARD_CONFIG in bixt/nn/triton_attention.py are set from.
- `crossover`: triton / sdpa time from 196 to 65,536 tokens, bf16 and fp32, inference and training: the lengths
  from which `auto` picks triton (bixt.nn.attention._TRITON_MIN_TOKENS).
- `model`: BiXT-Ti/16 at 224 px, batch 256, bf16 autocast, one AdamW training step: the authors' formulation (math
  backend, whole-sequence token MLPs) against ours on sdpa and on triton; images per second.
Times are medians of CUDA-event-timed repeats after warm-up (wall clock on CPU); all runs share one process.

benchmarks/results/triton_h200_a.json: every section, the first kernel (4 programs per SM, blocks (128, 8) forward and
(64, 8) backward); triton_h200_b.json: copy, kernel, configs and the bf16 crossover of the current one (16 programs
per SM, blocks (128, 4) and (128, 8)), the device time having run out before the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from bixt.io.atomic import atomic_write
from bixt.nn.attention import bidirectional_attention
from bixt.nn.layers import split_heads

console = Console()
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def timed(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of fn() over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, gib: float) -> dict:
    x = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), device)
    moved = 2 * x.numel() * x.element_size()
    return {"bytes": moved, "ms": ms, "gb_per_s": moved / ms / 1e6}


def attention_inputs(B, H, M, N, d, dtype, device):
    """R and V of both sides as the module makes them: token R and V split out of one packed projection."""
    g = torch.Generator(device="cpu").manual_seed(0)
    packed = torch.randn(B, N, 2 * H * d, generator=g).to(device, dtype).requires_grad_()
    r_lat, v_lat = (torch.randn(B, H, M, d, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    return r_lat, v_lat, packed


def attention_step(backend: str, inputs, train: bool):
    r_lat, v_lat, packed = inputs
    H = r_lat.shape[1]
    grads = None

    def run():
        nonlocal grads
        r_tok, v_tok = split_heads(packed, 2, H)
        with torch.set_grad_enabled(train), _flash_only(backend, r_lat):
            lat, tok = bidirectional_attention(r_lat, v_lat, r_tok, v_tok, backend=backend, packed_tok=packed)
            if train:
                if grads is None:
                    grads = (torch.randn_like(lat), torch.randn_like(tok))
                torch.autograd.grad((lat, tok), (r_lat, v_lat, packed), grads)
    return run


def _flash_only(backend: str, like: torch.Tensor):
    import contextlib

    if backend != "sdpa" or like.device.type != "cuda" or like.dtype == torch.float32:
        return contextlib.nullcontext()  # fp32 has no flash kernel: sdpa picks the memory-efficient one
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def kernel_section(device, lengths, dtype_name, heads=6, latents=64, head_dim=32, copy_gbs=None) -> list[dict]:
    rows = []
    dtype = DTYPES[dtype_name]
    for N in lengths:
        inputs = attention_inputs(1, heads, latents, N, head_dim, dtype, device)
        row = {"tokens": N, "dtype": dtype_name, "batch": 1, "heads": heads, "latents": latents, "head_dim": head_dim}
        for backend in ("triton", "sdpa"):
            for train in (False, True):
                key = f"{backend}_{'fwd_bwd' if train else 'fwd'}_ms"
                try:
                    row[key] = timed(attention_step(backend, inputs, train), device)
                except torch.OutOfMemoryError:
                    row[key] = None
                    torch.cuda.empty_cache()
        size = 2 if dtype != torch.float32 else 4
        row["fwd_bytes"] = heads * N * (3 * head_dim * size + 4)  # read R_tok, V_tok; write update, log-sum-exp
        if copy_gbs and row.get("triton_fwd_ms"):
            row["fwd_gb_per_s"] = row["fwd_bytes"] / row["triton_fwd_ms"] / 1e6
            row["fwd_share_of_copy"] = row["fwd_gb_per_s"] / copy_gbs
        for mode in ("fwd", "fwd_bwd"):
            t, s = row.get(f"triton_{mode}_ms"), row.get(f"sdpa_{mode}_ms")
            row[f"sdpa_over_triton_{mode}"] = s / t if t and s else None
        console.log(row)
        rows.append(row)
        del inputs
    return rows


CANDIDATES = ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))


def configs_section(device, lengths, heads=6, latents=64, head_dim=32) -> list[dict]:
    """Every candidate (BLOCK_N, num_warps) for both kernels: forward ms, and backward ms as (fwd+bwd) - fwd."""
    import bixt.nn.triton_attention as ta

    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for N in lengths:
        inputs = attention_inputs(1, heads, latents, N, head_dim, dtype, device)
        for cfg in CANDIDATES[:1] if ta.INTERPRETING else CANDIDATES:
            ta.FORCE = cfg
            try:
                fwd = timed(attention_step("triton", inputs, False), device)
                both = timed(attention_step("triton", inputs, True), device)
                row = {"tokens": N, "block_n": cfg[0], "num_warps": cfg[1], "fwd_ms": fwd, "bwd_ms": both - fwd}
            except Exception as e:  # noqa: BLE001 -- a candidate that does not compile or fit is a row too
                row = {"tokens": N, "block_n": cfg[0], "num_warps": cfg[1], "error": f"{type(e).__name__}: {e}"}
            finally:
                ta.FORCE = None
            console.log(row)
            rows.append(row)
    return rows


def model_section(device, img: int, batch: int, steps: int) -> dict:
    import bixt.nn.layers
    from bixt import create_model

    result = {"model": "bixt_ti_l64_p16", "img_size": img, "batch": batch, "amp": "bf16" if device.type == "cuda"
              else None}
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    chunk = bixt.nn.layers.TOKEN_CHUNK
    for run in ("authors", "sdpa", "triton"):
        bixt.nn.layers.TOKEN_CHUNK = 10**12 if run == "authors" else chunk  # theirs: whole-sequence token MLPs
        torch.manual_seed(0)
        model = create_model("bixt_ti_l64_p16", img_size=img).to(device).train()
        model.set_backend("math" if run == "authors" else run)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step(model=model, opt=opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = timed(step, device, warmup=2, repeats=steps)
        result[run] = {"step_ms": ms, "images_per_s": batch / ms * 1e3,
                       "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        console.log(run, result[run])
        model = opt = step = None  # free before the next run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bixt.nn.layers.TOKEN_CHUNK = chunk
    for run in ("sdpa", "triton"):
        result[f"{run}_over_authors"] = result[run]["images_per_s"] / result["authors"]["images_per_s"]
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/triton_gpu.json"))
    p.add_argument("--sections", nargs="+", default=["copy", "kernel", "configs", "crossover", "model"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check the code paths (CPU, interpreted)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        p.error("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) to check the script on a CPU")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("on a CPU the triton kernels need TRITON_INTERPRET=1")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "triton": __import__("triton").__version__, "smoke": args.smoke}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, (json.dumps(result, indent=1) + "\n").encode())

    if "copy" in args.sections:
        result["copy"] = copy_bandwidth(device, 0.01 if args.smoke else 2.0)
        console.log("copy", result["copy"])
        save()
    copy_gbs = result.get("copy", {}).get("gb_per_s")
    if "kernel" in args.sections:
        lengths = (256, 1024) if args.smoke else (65_536, 1_048_576)
        result["kernel"] = kernel_section(device, lengths, "bf16" if device.type == "cuda" else "fp32",
                                          copy_gbs=copy_gbs)
        save()
    if "configs" in args.sections:
        result["configs"] = configs_section(device, (256,) if args.smoke else (65_536, 1_048_576))
        save()
    if "crossover" in args.sections:
        result["crossover"] = []
        lengths = (64, 256) if args.smoke else (196, 1024, 4096, 16_384, 65_536)
        for dtype in ("bf16", "fp32") if device.type == "cuda" else ("fp32",):
            result["crossover"] += kernel_section(device, lengths, dtype)
            save()
    if "model" in args.sections:
        result["model"] = model_section(device, 32 if args.smoke else 224, 2 if args.smoke else 256,
                                        2 if args.smoke else 10)
        save()
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
