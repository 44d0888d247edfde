"""torch.compile for bixt's models: `compile_model`, the checks it makes before anything runs, and
`eager_under_compile`, which keeps the hand-written attention kernels (fused, triton) out of the compiled graph."""
from __future__ import annotations

import functools

import torch
from torch import nn

DEFAULT_BACKEND = "inductor"


_UNCOMPILED: list[tuple[object, list]] = []  # every eager_under_compile function and its disabled form, once made


def eager_under_compile(fn):
    """`fn` runs eagerly under torch.compile, as under torch.compiler.disable: one graph break around each call.

    For the fused and triton backends' entry points: they are kernels already, and dynamo tracing into them breaks
    the graph at every helper (sysfs reads, Python threads, Triton launches) for nothing. The disabled form is made
    by `compile_model` rather than at import, because importing torch._dynamo costs every command ~1.5 s; a model
    compiled by torch.compile directly makes it while tracing, at the price of a second graph break per call."""
    disabled: list = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return (disabled[0] if disabled else torch.compiler.disable(fn))(*args, **kwargs)
        return fn(*args, **kwargs)
    _UNCOMPILED.append((fn, disabled))
    return wrapper


def _disable_kernels() -> None:
    for fn, disabled in _UNCOMPILED:
        if not disabled:
            disabled.append(torch.compiler.disable(fn))


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with (g++ or $CXX), None when there is none."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        return get_cpp_compiler()
    except InvalidCxxCompiler:
        return None


def check_compile(device: str | torch.device, backend: str | None = None) -> None:
    """Refuse, in one line naming the fix, a compile that would otherwise fail only at the first step."""
    import torch._dynamo

    backend = backend or DEFAULT_BACKEND
    if not torch._dynamo.is_dynamo_supported():
        raise ValueError(f"torch.compile does not run with this Python or torch ({torch.__version__}): drop --compile")
    if backend != "inductor":
        return
    kind = torch.device(device).type
    if kind == "cpu" and _cpp_compiler() is None:
        raise ValueError("--compile on the CPU needs a C++ compiler for inductor (g++, or $CXX) and none was found: "
                         "install gcc/g++ or drop --compile")
    if kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("--compile on CUDA needs triton for inductor, which is not installed: install triton or "
                             "drop --compile")


def compile_model(model: nn.Module, *, backend: str | None = None, mode: str | None = None) -> nn.Module:
    """torch.compile(model) with `backend` (default DEFAULT_BACKEND, inductor), checked first (`check_compile`) on
    the device of the model's parameters.

    Compilation is lazy: it happens in the first call (and again in the first backward), which is what a caller
    times as the compile time. The returned module shares the model's parameters but prefixes its state_dict keys
    with `_orig_mod.`: save and load the model itself, not the compiled module."""
    backend = backend or DEFAULT_BACKEND  # read per call: tests of the plumbing swap in a cheaper backend
    param = next(model.parameters(), None)
    check_compile(param.device if param is not None else "cpu", backend)
    _disable_kernels()
    return torch.compile(model, backend=backend, mode=mode)
