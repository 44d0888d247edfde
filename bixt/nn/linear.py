"""Linear layers whose float32 CPU products run on oneDNN where it is this processor's faster library.

torch runs a float32 Linear on a CPU through MKL's sgemm, and adds the bias in a pass of its own (addmm copies it
into the output first). On a 2-core AMD EPYC (AVX-512, no AMX) oneDNN's kernels, which torch also ships, run BiXT-Ti's
Linear shapes 1.07-1.14x faster with the bias in the product, and take the token MLP's GELU into it as well (fp32
2048^3: 214-220 against 176-186 GFLOP/s). MKL is Intel's: on Intel CPUs it may well be the faster one, so the
choice is per machine: `BIXT_CPU_LINEAR=onednn|mkl` when set, else what `bixt tune` measured here (cached beside
the attention backends, bixt.nn.autotune), else oneDNN on AMD processors and MKL on the others.

oneDNN takes the forward and, in training, the input's gradient (a product of the same form); the weight's gradient
contracts over the tokens, which sit on the non-contiguous side of both operands, and MKL's strided sgemm is faster
there. bf16 products already run on oneDNN in torch, and autocast, tracing (fvcore counts aten::linear) and
torch.compile (inductor picks its own kernels) get the plain F.linear.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LIBRARIES = ("onednn", "mkl")
AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def builtin_library() -> str:
    from bixt.nn.autotune import cpu_vendor

    return "onednn" if AVAILABLE and cpu_vendor() == "AuthenticAMD" else "mkl"


_using: list[str] = []  # `using`'s stack: bixt tune times both libraries in one process


@contextlib.contextmanager
def using(library: str):
    """Run the Linears inside on `library` (one of LIBRARIES), whatever this machine's choice."""
    if library not in LIBRARIES:
        raise ValueError(f"no Linear library {library!r}: use one of {', '.join(LIBRARIES)}")
    _using.append(library)
    try:
        yield
    finally:
        _using.pop()


def cpu_library() -> str:
    """The library float32 CPU Linears run on here: `using`'s, the environment's, the tuned, or the built-in one."""
    return _choice()[0]


def cpu_library_source() -> str:
    """Where `cpu_library()`'s answer comes from, in words (`bixt tune --show`)."""
    return _choice()[1]


def _choice() -> tuple[str, str]:
    if _using:
        return (_using[-1] if AVAILABLE else "mkl"), "bixt.nn.linear.using"
    forced = os.environ.get("BIXT_CPU_LINEAR", "")
    if forced:
        if forced not in LIBRARIES:
            raise ValueError(f"BIXT_CPU_LINEAR={forced!r}: use one of {', '.join(LIBRARIES)}, or unset it")
        return (forced if AVAILABLE else "mkl"), "BIXT_CPU_LINEAR"
    if not AVAILABLE:
        return "mkl", "the only one in this torch"
    from bixt.nn.autotune import linear_choice

    tuned = linear_choice()
    if tuned is not None:
        return tuned, "cache"
    return builtin_library(), "built-in (oneDNN on AMD, MKL elsewhere)"


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "none") -> Tensor:
    """x @ weight.T + bias, then `act` ("none" or "gelu"), in one oneDNN primitive (float32 or bf16, CPU)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "none" if act == "gelu" else "")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(g, weight.t().contiguous()).view(x.shape)
        if ctx.needs_input_grad[1]:
            gw = g.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


# Rows (tokens across the batch) from which oneDNN takes a product. Below them MKL's small-matrix path wins, and in
# training the autograd Function's own overhead and the weight's transposed copy outweigh the faster kernel.
# Measured on the 2-core EPYC, fwd (+ bwd) of 192 -> 768: 64 rows 119 against 128 us (663 against 425 us in
# training), 2,048 rows even in training, 6,272 rows 1.08x faster in training, 1.10x in inference.
MIN_ROWS = {"train": 4096, "infer": 256}


def _on_onednn(x: Tensor, weight: Tensor) -> bool:
    return (not torch.jit.is_tracing() and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and cpu_library() == "onednn")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """F.linear(x, weight, bias), then GELU with `gelu`: on oneDNN where `cpu_library()` says so (see above)."""
    if _on_onednn(x, weight):
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            if rows >= MIN_ROWS["train"]:
                y = _OneDnnLinear.apply(x, weight, bias)
                return F.gelu(y) if gelu else y  # backward needs the pre-activation: the fused op keeps it to itself
        elif rows >= MIN_ROWS["infer"]:
            return onednn_linear(x, weight, bias, "gelu" if gelu else "none")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) running on `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
