"""This machine's fastest bi-directional attention backend per shape on CPU, measured by `bixt tune`, read by `auto`.

Which backend wins moves with the processor, its thread count and torch's kernels, and with the shape, not only
with the tokens in the batch: on a 2-core Xeon, fused beats sdpa from 3,072 tokens of one sample in training, yet
loses at 32 x 196 = 6,272, where math beats both. So `bixt tune` times sdpa, math and fused over a ladder of
(batch, tokens) shapes and stores the fastest per shape; `auto` takes the choice of the measured shape nearest to
its own (Euclidean distance over log2 of the batch size and log2 of the sample's tokens), and without an entry
falls back to `bixt.nn.fused.fused_wins`' built-in thresholds. The float32 entry also records which library ran
float32 Linears faster in the same tuning (`linear`: onednn or mkl, read by bixt.nn.linear); entries without it,
written by an older bixt, leave the Linears on the built-in choice.

The cache is one JSON file (never a pickle: it is read on every machine that imports bixt): `tune.json` in
`$BIXT_CACHE_DIR`, else `$XDG_CACHE_HOME/bixt`, else `~/.cache/bixt`. It holds one entry per machine key (CPU model,
torch threads, torch major.minor, device type, and the dtype where it is not float32: bf16's winners differ), so a
home directory shared between machines keeps each one's own.
`BIXT_NO_TUNE_CACHE=1` ignores it (reproducible tests and CI). A file that cannot be read or parsed never stops a
model: it is ignored with one warning, and `bixt tune` rewrites it.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch

from bixt.nn.linear import LIBRARIES

FILE = "tune.json"
VERSION = 2
BACKENDS = ("sdpa", "math", "fused")
MODES = {True: "train", False: "infer"}  # JSON keys of the choices, by whether a backward pass follows
Choices = tuple[tuple[int, int, str], ...]  # (batch, tokens per sample, fastest backend) per measured shape


def cache_path() -> Path:
    root = os.environ.get("BIXT_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "bixt") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "bixt")
    return Path(root) / FILE


def disabled() -> bool:
    return os.environ.get("BIXT_NO_TUNE_CACHE", "") not in ("", "0")


@functools.cache
def _cpuinfo(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.partition(":")[0].strip() == field:
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown cpu"


def cpu_vendor() -> str:
    """GenuineIntel, AuthenticAMD, ..., or '' where /proc/cpuinfo does not say."""
    return _cpuinfo("vendor_id") or ""


def machine_key(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """What a measured crossover holds for: threads are read now, as a process may change them after import. A
    dtype other than float32 (bf16 under `--amp`, where the winners differ) is an entry of its own."""
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    key = f"{cpu_model()} | {torch.get_num_threads()} threads | torch {torch_version} | {device_type}"
    return key if dtype == torch.float32 else f"{key} | {dtype_name(dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _choices(rows) -> Choices:
    out = []
    for row in rows:
        batch, tokens, backend = row
        if backend not in BACKENDS or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                          for v in (batch, tokens)):
            raise ValueError(f"a choice must be [batch, tokens, one of {', '.join(BACKENDS)}], got {row!r}")
        out.append((batch, tokens, backend))
    if not out:
        raise ValueError("an entry without measured shapes")
    return tuple(out)


def _parse(text: bytes) -> dict[str, dict[bool, Choices]]:
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("machines"), dict):
        raise ValueError("no 'machines' object")
    if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r}, this bixt reads version {VERSION}")
    return {key: {training: _choices(entry["choices"][mode]) for training, mode in MODES.items()}
            for key, entry in data["machines"].items()}


@functools.cache  # read once per process (and path); `clear()` after writing it or in tests
def _read(path: str) -> dict[str, dict[bool, Choices]]:
    try:
        with open(path, "rb") as f:
            text = f.read()  # bytes: json decodes them, so undecodable ones are one more parse error below
    except FileNotFoundError:
        return {}
    except OSError as e:
        return _ignored(path, e.strerror or str(e))
    try:
        return _parse(text)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        return _ignored(path, str(e).splitlines()[0] if str(e) else type(e).__name__)


def _ignored(path: str, problem: str) -> dict:
    warnings.warn(f"ignoring the attention tune cache {path} ({problem}): run `bixt tune` to rewrite it, "
                  "or delete it", RuntimeWarning, stacklevel=3)
    return {}


def clear() -> None:
    """Forget what was read, so the next lookup reads the file again."""
    _read.cache_clear()
    _entry.cache_clear()
    _linear.cache_clear()


def lookup(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[bool, Choices] | None:
    """This machine's measured choices {training: ((batch, tokens, backend), ...)} for `dtype`, or None when the
    cache has no entry for it (or is disabled)."""
    if disabled():
        return None
    env = os.environ
    return _entry(env.get("BIXT_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"), torch.get_num_threads(),
                  device_type, dtype)


@functools.cache  # auto asks on every attention call: a few dictionary lookups, not a path and key built anew
def _entry(cache_dir, xdg, home, threads: int, device_type: str, dtype: torch.dtype) -> dict[bool, Choices] | None:
    return _read(str(cache_path())).get(machine_key(device_type, dtype))


def linear_choice() -> str | None:
    """The library (bixt.nn.linear.LIBRARIES) `bixt tune` measured faster for float32 Linears here, or None."""
    if disabled():
        return None
    env = os.environ
    return _linear(env.get("BIXT_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"), torch.get_num_threads())


@functools.cache  # asked on every Linear call
def _linear(cache_dir, xdg, home, threads: int) -> str | None:
    if not _read(str(cache_path())):  # missing or unreadable (warned about once, there)
        return None
    info = entry_info()
    choice = info.get("linear") if isinstance(info, dict) else None
    return choice if choice in LIBRARIES else None


@functools.lru_cache(maxsize=1024)  # asked on every attention call, with the few shapes a run has
def nearest(choices: Choices, batch: int, tokens: int) -> str:
    """The backend measured fastest at the shape nearest to (batch, tokens): Euclidean distance over log2 of the
    batch size and of the sample's tokens, ties to the earlier shape. Batch and sample length move the crossovers
    apart (many short samples favour math, long ones fused), so both count in full: the sum of log2 distances in
    the batch's tokens and the sample's, used before, sent 4 x 576 to 1 x 2,048's sdpa instead of 8 x 196's math,
    1.3-1.5x slower in bixt tune's check on an AMD EPYC (benchmarks/results/tune_epyc_2t.txt)."""
    def distance(row: tuple[int, int, str]) -> float:
        b, n, _ = row
        return math.hypot(math.log2(b) - math.log2(batch), math.log2(n) - math.log2(tokens))
    return min(choices, key=distance)[2]


def choose(training: bool, batch: int, tokens: int, device_type: str = "cpu",
           dtype: torch.dtype = torch.float32) -> str | None:
    """The backend `auto` runs bi-directional attention on for this shape, or None without a cache entry."""
    entry = lookup(device_type, dtype)
    return None if entry is None else nearest(entry[training], batch, tokens)


def store(choices: dict[bool, Choices], how: str, device_type: str = "cpu",
          dtype: torch.dtype = torch.float32, linear: str | None = None) -> Path:
    """Write this machine's choices into the cache (other machines' entries kept), with the faster Linear library
    where measured; returns the file."""
    path = cache_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        machines = data["machines"] if isinstance(data, dict) and isinstance(data.get("machines"), dict) else {}
        machines = machines if data.get("version") == VERSION else {}  # an older layout: this write replaces it
    except (OSError, ValueError):
        machines = {}  # missing or corrupt: this write replaces it
    machines[machine_key(device_type, dtype)] = {
        "choices": {mode: [list(c) for c in _choices(choices[t])] for t, mode in MODES.items()},
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "how": how, "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": device_type, "dtype": dtype_name(dtype), **({"linear": linear} if linear else {})}
    _write_atomic(path, json.dumps({"version": VERSION, "machines": machines}, indent=2) + "\n")
    clear()
    return path


def entry_info(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> dict | None:
    """This machine's raw cache entry for `dtype` (when and how it was measured), or None."""
    try:
        return json.loads(cache_path().read_text(encoding="utf-8"))["machines"][machine_key(device_type, dtype)]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    # A reader (another process importing bixt) sees the old file or the new one, never half of it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

