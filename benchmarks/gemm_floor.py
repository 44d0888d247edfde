"""The matmul floor of a step: the time its matrix products alone take on this machine, everything else removed.

`record(step)` runs the step once under a TorchDispatchMode and counts every matrix product it dispatches (mm,
addmm, bmm, baddbmm, backward ones included) by operand shapes and strides. `replay(products)` runs each distinct
product alone, with fresh operands of those shapes and strides, and sums median time x count. Bias and residual
terms (addmm's and baddbmm's first operand) are dropped: they are elementwise work, not the product. Each product
is timed back to back with its own operands, in cache, so the floor is the least the products can take: a step
doing the same products cannot be faster than it, whatever elementwise work it fuses away.

    python benchmarks/gemm_floor.py --tokens 196 --mode train     # the authors' BiXT-Ti step, with its floor
    python benchmarks/gemm_floor.py --tokens 196 --mode train --bf16   # its products in bf16 (autocast's)

float32 products that are a Linear's (a contiguous input, a transposed weight) are timed on oneDNN too, and the
faster counts (on an AMD EPYC, oneDNN's kernels run them up to 1.14x faster than torch's MKL sgemm).

The tokenizer's convolution is left out (a few percent of a step, the same in every implementation), which only
lowers the floor.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bixt.nn import linear as bixt_linear

aten = torch.ops.aten
# op -> (index of the first product operand, the plain product that replaces it)
_PRODUCTS = {aten.mm.default: (0, torch.mm), aten.addmm.default: (1, torch.mm), aten.bmm.default: (0, torch.bmm),
             aten.baddbmm.default: (1, torch.bmm)}

Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.products: Counter[tuple[str, Layout, Layout]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _PRODUCTS:
            first = _PRODUCTS[func][0]
            a, b = args[first], args[first + 1]
            self.products[func.name(), (tuple(a.shape), a.stride(), a.dtype),
                          (tuple(b.shape), b.stride(), b.dtype)] += 1
        return func(*args, **(kwargs or {}))


def record(step) -> Counter:
    """The matrix products one call of `step` dispatches: {(op, a layout, b layout): count}."""
    with _Recorder() as rec:
        step()
    return rec.products


def _operand(layout: Layout) -> torch.Tensor:
    shape, stride, dtype = layout
    # A storage of the size the layout spans, filled, then viewed: strides may overlap (an expanded gradient).
    span = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    return torch.randn(span).to(dtype).as_strided(shape, stride)


def _ways(fn, a: torch.Tensor, b: torch.Tensor):
    """The product as torch runs it, and where a float32 mm's operands already are in a Linear's layout (rows of a
    contiguous, b a transposed weight), as oneDNN's Linear runs it (bixt.nn.linear): the floor takes the faster."""
    yield lambda: fn(a, b)
    if (fn is torch.mm and a.dtype == torch.float32 and bixt_linear.AVAILABLE and a.is_contiguous()
            and b.t().is_contiguous()):
        w = b.t()
        yield lambda: bixt_linear.onednn_linear(a, w)


def replay(products: Counter, repeats: int = 5) -> float:
    """Seconds the products take alone: per distinct product, the median of `repeats` timed runs (after one
    warm-up) of its fastest way (`_ways`), times its count."""
    total = 0.0
    for (name, la, lb), count in products.items():
        fn = _PRODUCTS[getattr(aten, name.split("::")[1].split(".")[0]).default][1]
        a, b = _operand(la), _operand(lb)
        best = float("inf")
        for way in _ways(fn, a, b):
            way()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                way()
                times.append(time.perf_counter() - t0)
            best = min(best, statistics.median(times))
        total += best * count
    return total


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_authors import batch_for, models, step_fn, time_steps

    from bixt.nn.allocator import tune_allocator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=196)
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--bf16", action="store_true",
                   help="record the step under bf16 autocast: its bf16 products' floor against the fp32 step")
    args = p.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    _, theirs = models(args.tokens)
    side = 16 * int(args.tokens ** 0.5)
    x = torch.randn(batch_for(args.tokens), 3, side, side)
    step = step_fn(theirs, x, args.mode, bf16=args.bf16)
    step()
    if args.mode == "infer":  # under inference_mode nothing reaches a Python dispatch mode: the same products
        def counted():       # recorded under no_grad
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                theirs(x)
        products = record(counted)
    else:
        products = record(step)
    floor = replay(products)
    fp32 = step_fn(theirs, x, args.mode, bf16=False)
    whole = statistics.median(time_steps(fp32, 3.0)[2])
    head = f"{args.tokens} tokens x{batch_for(args.tokens)} {args.mode}: the authors' fp32 step {whole * 1e3:.0f} ms"
    if args.bf16:
        amp = statistics.median(time_steps(step, 3.0)[2])
        head += f", under bf16 autocast {amp * 1e3:.0f} ms"
    kind = "bf16 " if args.bf16 else ""
    print(f"{head}, its {sum(products.values())} {kind}matrix products ({len(products)} distinct) alone "
          f"{floor * 1e3:.0f} ms: at most {whole / floor:.2f}x faster than the fp32 step with the same products")


if __name__ == "__main__":
    main()
