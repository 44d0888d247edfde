"""`bixt tune`: the fastest bi-directional attention backend per shape on this machine's CPU, cached for `auto`.

For each shape of a ladder of (batch, tokens) shapes, the sdpa, math and fused backends of `bidirectional_attention`
run round-robin in this process (repeat 1 of each, then repeat 2, ..., every other round reversed), so a change in
the machine's load hits them alike; the median time is kept. Two modes: `train` is forward + backward with inputs
that require gradients, `infer` a forward under inference mode. float32, H x M x d_h of BiXT-Ti (6 x 64 x 32) by
default. The fastest backend per shape is cached (`bixt.nn.autotune`); `auto` takes the one of the nearest
measured shape.

The check (`check`, run by `tune` after it caches): a second, independent measurement at shapes off the ladder
(and two on it), where `auto_over_best` is the time of auto's choice over the best single backend's: what `auto` is
worth at shapes it was not tuned on.

Other work on the cores scatters every timing, and not evenly (on a 2-core Xeon shared with another job, fused
gained on sdpa), so a tuning on a busy machine does not hold on an idle one: the load average is recorded and a
busy machine warned about.
"""
from __future__ import annotations

import os
import statistics
from collections.abc import Callable

import torch

from bixt.measure.profile import DTYPES as PROFILE_DTYPES
from bixt.measure.profile import time_step
from bixt.nn import autotune
from bixt.nn import linear as bixt_linear
from bixt.nn.attention import bidirectional_attention

BACKENDS = ("sdpa", "math", "fused")
MODES = {"train": True, "infer": False}
DTYPES = {k: PROFILE_DTYPES[k] for k in ("fp32", "bf16")}  # bf16: the attention's inputs under --amp
# (batch, tokens): batch 1 up the ladder, and the batched shapes of BiXT-Ti at 224 px (196 tokens) and above.
LADDER = ((1, 256), (1, 1024), (8, 196), (1, 2048), (1, 3072), (1, 4096), (32, 196), (1, 6144), (1, 8192),
          (16, 576), (1, 12288), (1, 16384), (8, 3136), (1, 32768), (1, 65536))
QUICK_LADDER = ((1, 256), (4, 196), (1, 2048))
# Shapes off the ladder (and two on it) for the check: where auto's nearest-shape choice is put to the test.
CHECK_LADDER = ((2, 1024), (64, 196), (4, 576), (1, 5120), (32, 196), (2, 8192), (1, 24576))
QUICK_CHECK_LADDER = ((2, 512),)
# The Linear library (bixt.nn.linear): BiXT-Ti's token MLP (192 -> 768 -> 192) over 32 x 196 tokens, the shapes
# that dominate its cost; --quick over 4,096 tokens (the least on which oneDNN takes a product in training).
LINEAR_SHAPES = ((6272, 192, 768), (6272, 768, 192))
QUICK_LINEAR_SHAPES = ((4096, 192, 768),)
REPEATS, QUICK_REPEATS = 9, 2  # 9: 35 s on an idle 2-core Xeon, 85 s on a busy one

Progress = Callable[[int, int, str], None]


def tuned_dtype(name: str) -> torch.dtype:
    """The dtype `bixt tune --dtype` names, refused in one line where it cannot be tuned here."""
    from bixt.nn.precision import cpu_supports_bf16

    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one auto is tuned for: use {' or '.join(DTYPES)}")
    if DTYPES[name] == torch.bfloat16 and not cpu_supports_bf16():
        raise ValueError("--dtype bf16 needs a CPU with bf16 support (AVX512-BF16 or AMX), as --amp does: "
                         "tune fp32 here")
    return DTYPES[name]


def _inputs(B: int, H: int, M: int, N: int, d: int, grad: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(B, H, L, d, generator=g).to(dtype).requires_grad_(grad) for L in (M, M, N, N)]
    return x, [torch.randn(B, H, M, d, generator=g).to(dtype), torch.randn(B, H, N, d, generator=g).to(dtype)]


def make_step(backend: str, shape: tuple[int, int, int, int, int], training: bool,
              dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """One call of the backend on fixed inputs: forward + backward (`training`) or an inference-mode forward."""
    x, cot = _inputs(*shape, grad=training, dtype=dtype)
    if not training:
        def infer():
            with torch.inference_mode():
                bidirectional_attention(*x, backend=backend)
        return infer

    def train():
        out = bidirectional_attention(*x, backend=backend)
        torch.autograd.grad(out, x, cot)
    return train


def time_shape(shape: tuple[int, int, int, int, int], training: bool, repeats: int,
               dtype: torch.dtype = torch.float32) -> dict:
    """Median seconds per backend, round-robin after one warm-up call each; under "min", the fastest call of each
    (less sensitive to other work on the machine, kept for comparison)."""
    steps = {b: make_step(b, shape, training, dtype) for b in BACKENDS}
    cpu = torch.device("cpu")
    for step in steps.values():
        step()
    times = {b: [] for b in BACKENDS}
    for i in range(repeats):
        # every other round in reverse, so that no backend always runs right after the same one (warm caches)
        for b in BACKENDS[:: -1 if i % 2 else 1]:
            times[b].append(time_step(steps[b], cpu))
    return {**{b: statistics.median(t) for b, t in times.items()}, "min": {b: min(t) for b, t in times.items()}}


def measure(heads: int = 6, latents: int = 64, head_dim: int = 32, lengths=LADDER, repeats: int = REPEATS,
            progress: Progress | None = None, dtype: torch.dtype = torch.float32) -> dict[str, list[dict]]:
    """{mode: rows}, each row a shape's median seconds per backend (and their minimum, under "min")."""
    table = {mode: [] for mode in MODES}
    total, done = len(lengths) * len(MODES), 0
    for B, N in lengths:
        for mode, training in MODES.items():
            if progress:
                progress(done, total, f"{mode} {B} x {N}")
            med = time_shape((B, heads, latents, N, head_dim), training, repeats, dtype)
            table[mode].append({"batch": B, "tokens": N, "batch_tokens": B * N, **med})
            done += 1
    if progress:
        progress(done, total, "done")
    return table


def best(row: dict) -> str:
    return min(BACKENDS, key=lambda b: row[b])


def choices(table: dict[str, list[dict]]) -> dict[bool, autotune.Choices]:
    """The fastest backend per measured shape, by whether a backward pass follows."""
    return {MODES[mode]: tuple((r["batch"], r["tokens"], best(r)) for r in rows) for mode, rows in table.items()}


def judged(table: dict[str, list[dict]], chosen: dict[bool, autotune.Choices]) -> dict[str, list[dict]]:
    """Rows with the backend `auto` picks there from `chosen` and its time over the best single backend's."""
    out = {}
    for mode, rows in table.items():
        out[mode] = []
        for r in rows:
            pick = autotune.nearest(chosen[MODES[mode]], r["batch"], r["tokens"])
            out[mode].append({**r, "chosen": pick, "best": best(r), "auto_over_best": r[pick] / r[best(r)]})
    return out


def tune(heads: int = 6, latents: int = 64, head_dim: int = 32, lengths=LADDER, repeats: int = REPEATS,
         progress: Progress | None = None, write_cache: bool = True, check_lengths=CHECK_LADDER,
         dtype: torch.dtype = torch.float32, linear_shapes=LINEAR_SHAPES) -> dict:
    """Measure, cache the fastest backend per shape for this machine and `dtype` (unless `write_cache` is False),
    with float32 the faster Linear library (`linear_shapes`; none: not measured, the cached one kept), then check
    auto's choices on a second measurement (`check_lengths`; none: no check). The result: per-mode rows (seconds
    per backend, the fastest), the check's rows (auto's choice, auto_over_best), the Linear libraries' times and the
    faster, machine key, cache file, load."""
    load = [load_average()]
    linear_times = time_linear(linear_shapes, repeats) \
        if dtype == torch.float32 and linear_shapes and bixt_linear.AVAILABLE else None
    linear = faster_linear(linear_times) if linear_times else (autotune.entry_info() or {}).get("linear")
    table = measure(heads, latents, head_dim, lengths, repeats, progress, dtype)
    chosen = choices(table)
    name = autotune.dtype_name(dtype)
    how = (f"bixt tune: H={heads}, M={latents}, d_h={head_dim}, {name}, medians of {repeats} round-robin calls "
           f"at {len(lengths)} shapes from {min(b * n for b, n in lengths)} to {max(b * n for b, n in lengths)} "
           "tokens in the batch")
    path = autotune.store(chosen, how, dtype=dtype, linear=linear if dtype == torch.float32 else None) \
        if write_cache else None
    checked = judged(measure(heads, latents, head_dim, check_lengths, repeats, progress, dtype), chosen) \
        if check_lengths else {}
    load.append(load_average())
    worst = max((r["auto_over_best"] for rs in checked.values() for r in rs), default=None)
    return {"machine": autotune.machine_key(dtype=dtype), "dtype": name, "heads": heads, "latents": latents,
            "head_dim": head_dim,
            "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "rows": judged(table, chosen), "check": checked, "worst_auto_over_best_in_check": worst,
            "how": how, "cache": None if path is None else str(path),
            "linear": None if linear_times is None else {"seconds": linear_times, "faster": linear},
            "load_average": {"before": load[0], "after": load[1], "cores": cores()}}


def time_linear(shapes=LINEAR_SHAPES, repeats: int = REPEATS) -> dict[str, dict[str, float]]:
    """{library: {mode: seconds}}: float32 Linears of `shapes` (rows, in, out) on each library, forward + backward
    (`train`) and an inference-mode forward (`infer`), summed over the shapes, medians of round-robin calls."""
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(n, i, generator=g, requires_grad=True), torch.randn(o, i, generator=g, requires_grad=True),
               torch.randn(o, generator=g, requires_grad=True), torch.randn(n, o, generator=g)) for n, i, o in shapes]

    def train():
        for x, w, b, cot in layers:
            torch.autograd.grad(bixt_linear.linear(x, w, b), (x, w, b), cot)

    def infer():
        with torch.inference_mode():
            for x, w, b, _ in layers:
                bixt_linear.linear(x, w, b)

    cpu = torch.device("cpu")
    times = {lib: {"train": [], "infer": []} for lib in bixt_linear.LIBRARIES}
    for i in range(repeats + 1):  # the first round warms up
        for lib in bixt_linear.LIBRARIES[:: -1 if i % 2 else 1]:
            with bixt_linear.using(lib):
                for mode, step in (("train", train), ("infer", infer)):
                    t = time_step(step, cpu)
                    if i:
                        times[lib][mode].append(t)
    return {lib: {m: statistics.median(t) for m, t in modes.items()} for lib, modes in times.items()}


def faster_linear(times: dict[str, dict[str, float]]) -> str:
    """The library with the least training + inference time."""
    return min(times, key=lambda lib: sum(times[lib].values()))


def load_average() -> float | None:
    """The 1-minute load average: other work on the cores inflates and scatters every timing."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def busy(load: float | None) -> bool:
    """Whether other work held more than half a core on average over the last minute (before tuning starts)."""
    return load is not None and load > 0.5


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def current() -> dict:
    """What `auto` uses on this machine now, per dtype (the cached choices, or the built-in rules) and its
    source."""
    from bixt.nn.attention import CPU_BF16_RULE  # the built-in fallbacks of auto_bidirectional
    from bixt.nn.fused import _AUTO_MIN_TOKENS

    out = {"cache": str(autotune.cache_path()), "dtypes": {}, "linear": bixt_linear.cpu_library(),
           "linear_source": bixt_linear.cpu_library_source(),
           "builtin_fused_from": {m: _AUTO_MIN_TOKENS[t] for m, t in MODES.items()}, "builtin_bf16": CPU_BF16_RULE}
    for name, dtype in DTYPES.items():
        entry = autotune.lookup(dtype=dtype)
        source = "cache" if entry is not None else ("built-in (BIXT_NO_TUNE_CACHE set)" if autotune.disabled()
                                                    else "built-in (no entry for this machine)")
        out["dtypes"][name] = {
            "machine": autotune.machine_key(dtype=dtype), "source": source,
            "choices": None if entry is None else {m: [list(c) for c in entry[t]] for m, t in MODES.items()},
            "entry": autotune.entry_info(dtype=dtype) if entry is not None else None}
    return out
