"""The scaling sweep behind `bixt compare`: every model at every sequence length, same inputs, dtype and device.

Per configuration: the closed-form MACs and the step times measured so far predict its time (`StepModel`). It is
counted (fvcore) when one forward fits the budget, and each mode (infer, train) runs in a fresh process
(`bixt.measure.profile.measure`) unless its prediction would take the configuration past the budget: then that mode is
`skipped`, with the prediction in the message. OOM and errors are recorded in the row (status and message) and the
sweep goes on. After every row results.csv and results.json are rewritten atomically (a temporary file, then a
rename), so a killed sweep leaves every finished row in two valid files. At the end: exponents.csv (log-log slope
per model and metric, with R^2), ratios.csv (the first model against each other one) and three log-log PNG plots.

`gmacs` is the architecture's count (one similarity matrix per layer, the paper's convention; see
`bixt.measure.profile.count`), the same whichever backend runs: the time prediction, the GMACs plot's first panel
and the `gmacs` exponent use it. `gmacs_executed` (on `macs_backend`) is what the backend that ran computes; it
has its own exponent and the plot's second panel.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np

from bixt.io.atomic import atomic_write
from bixt.measure.flops import ARCHITECTURE_BACKEND, analytic_macs
from bixt.measure.memory import is_oom
from bixt.measure.profile import (
    DEFAULT_PLAN,
    MODE_KEYS,
    MODES,
    Plan,
    Setup,
    _first_line,
    count,
    describe,
    failure,
    measure,
    mode_columns,
    prepare,
)
from bixt.measure.profile import trace as profile_trace
from bixt.models.registry import families, get_entry, list_models

DEFAULT_MODEL = "bixt_ti_l64_p16"
DEFAULT_SEQ_LENS = (256, 1024, 4096, 16384)
# The model a family stands for in a comparison (a family not listed here stands for all its models).
FAMILY_DEFAULTS = {"bixt": ("bixt_ti_l64_p16",), "bixt-ablation": ("bixt_ti_iterative", "bixt_ti_sequential"),
                   "vit": ("vit_ti_p16",), "perceiver": ("perceiver_ti",)}
# Published GMACs (fvcore, batch 1, default input) and parameter counts: BiXT paper / authors' code, DeiT paper.
PUBLISHED = {
    "bixt_ti_l64_p16": (1.67, 15_121_192),
    "bixt_ti_l64_p16s8": (4.69, 15_121_192),
    "bixt_ti_l64_p16s4": (16.74, 15_121_192),
    "bixt_ed256_l64_p16": (2.91, 26_682_088),
    "bixt_ti_cnv_l64_p16": (1.7574, 15_192_640),
    "vit_ti_p16": (1.26, 5_717_416),
}
# Metrics fitted and plotted against the sequence length; the mode's status must be ok for its metrics.
METRICS = ("gmacs", "gmacs_executed", "infer_step_ms", "train_step_ms", "infer_samples_per_sec",
           "train_samples_per_sec", "infer_peak_mem_mib", "train_peak_mem_mib", "infer_act_mem_mib",
           "train_act_mem_mib")
PROCESS_OVERHEAD_S = 3.0  # starting a fresh Python with torch and building the model, for the time prediction
COLUMNS = ("model", "family", "seq_len", "img_size", "batch_size", "device", "dtype", "amp", "grad_checkpointing",
           "compile", "backend", "status", "message", "predicted_s", "elapsed_s", "param_count", "gmacs",
           "gmacs_analytic", "gmacs_attention", "gmacs_rest", "gmacs_executed", "macs_backend", "unsupported_ops",
           *(f"{m}_{k}" for m in MODES for k in ("status", "message", *MODE_KEYS)), "torch_version", "threads")


@dataclasses.dataclass(frozen=True)
class Sweep:
    models: tuple[str, ...] = (DEFAULT_MODEL, "vit_ti_p16", "perceiver_ti")
    seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str | None = None  # None: each model's default ("auto")
    budget_s: float = 300.0  # per configuration, all its modes together
    modes: tuple[str, ...] = MODES
    plan: Plan = DEFAULT_PLAN
    fit_from: int = 1024  # exponents are fitted over the lengths >= this that ran (all of them if fewer than 2)
    total_s: float | None = None  # the whole sweep's budget (--quick); a configuration gets at most what is left
    grad_checkpointing: bool = False  # training recomputes each layer's activations (Setup.grad_checkpointing)
    amp: bool = False  # autocast with fp32 weights (Setup.amp)
    compile: bool = False  # torch.compile'd models, the compile time apart (Setup.compile)

    def setup(self, model: str, seq_len: int) -> Setup:
        return Setup(model, seq_len, self.batch_size, self.device, self.dtype, self.backend,
                     grad_checkpointing=self.grad_checkpointing, amp=self.amp, compile=self.compile)


# --quick: three lengths, short timing, 20 s per configuration and 150 s in all (published counts: closed form only).
QUICK = {"seq_lens": (256, 1024, 4096), "budget_s": 20.0, "total_s": 150.0}


def resolve_models(models: list[str] | None, baselines: list[str] | None,
                   defaults: dict[str, tuple[str, ...]] = FAMILY_DEFAULTS, matched_for: str | None = None
                   ) -> tuple[str, ...]:
    """--models (default: the `bixt` family's model in `defaults`, BiXT-Ti/16) plus --baselines, each a family (its
    models in `defaults`) or a model name. `matched_for` (e.g. "image data"): `defaults` are the only models a family
    may stand for there, and a family missing from them is an error; otherwise it stands for all its models."""
    names = list(models or defaults["bixt"])
    for item in baselines or []:
        if item in defaults:
            names += defaults[item]
        elif item in list_models():
            names.append(item)
        elif item in families() and matched_for:
            raise ValueError(f"no matched CPU-sized {item} model for {matched_for}: name one from `bixt models`")
        elif item in families():
            names += list_models(family=item)
        else:
            raise ValueError(f"unknown baseline {item!r}: give a family ({', '.join(families())}) or a model name "
                             "from `bixt models`")
    for name in names:
        get_entry(name)  # unknown names: one line with the closest matches
    return tuple(dict.fromkeys(names))


def check_sweep(sweep: Sweep) -> None:
    """Every configuration is valid (lengths, batch, device, backend): fail before anything runs or is written."""
    if not sweep.models or not sweep.seq_lens:
        raise ValueError("nothing to compare: give at least one model and one sequence length")
    if not 0 < sweep.budget_s < math.inf or (sweep.total_s is not None and not 0 < sweep.total_s < math.inf):
        raise ValueError(f"--budget-s must be positive and finite, got {sweep.budget_s}: pass the seconds one "
                         "configuration may take")  # nan compares false both ways: it would pass `<= 0`
    for model in sweep.models:
        for n in sweep.seq_lens:
            prepare(sweep.setup(model, n))


def prepare_out(out: Path | None) -> Path:
    """The output folder: checked writable and free of an earlier sweep; created only by `run_sweep`."""
    out = Path(out) if out is not None else Path("results") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder path")
    if (out / "results.json").exists() or (out / "results.csv").exists():
        raise ValueError(f"--out {out} already holds a sweep: give a new folder so its results stay intact")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to --out {out} ({parent} is not a writable folder): choose a writable path")
    return out


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


class ResultsWriter:
    """results.csv and results.json hold every finished row after each `add`, whenever the sweep stops."""

    def __init__(self, out: Path, columns: tuple[str, ...] = COLUMNS):
        self.out, self.columns, self.rows = out, columns, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        _atomic_write(self.out / "results.json", json.dumps(self.rows, indent=1) + "\n")
        _atomic_write(self.out / "results.csv", rows_to_csv(self.rows, self.columns))


def rows_to_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, dict) else ("" if v is None else v)
                         for k, v in row.items()})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Predicting a configuration's time from its MACs and the rates measured so far.


def extrapolate(points: list[tuple[float, float]], macs: float) -> float:
    """Seconds of a step of `macs` from (MACs, seconds) steps measured before: the line a + b * MACs fitted through
    them (a: the fixed cost per step, which dominates short inputs); from a single point, proportional (cautious
    when that fixed cost dominates)."""
    if len({x for x, _ in points}) >= 2:
        b, a = np.polyfit(*zip(*points, strict=True), 1)
        if b > 0:
            return max(float(a + b * macs), 0.0)
    x, y = max(points)
    return y * macs / x


class StepModel:
    """The step times measured so far, per model and mode, and what they predict for a configuration not yet run.

    Times are fitted against the architecture's count (`gmacs`), which the closed form gives before anything runs,
    whatever the backend; a backend's extra work (sdpa's second similarity matrix) grows with the tokens as the rest
    does, so the line fitted through a model's measured steps absorbs it."""

    def __init__(self):
        self.points: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self.compile_s: dict[tuple[str, str], float] = {}  # --compile: the last compile time, about the same per length

    def add(self, row: dict) -> None:
        for mode in MODES:
            step = row.get(f"{mode}_step_ms")
            if row.get(f"{mode}_status") == "ok" and step and row.get("gmacs"):
                macs = row["gmacs"] * 1e9 * row["batch_size"]
                self.points.setdefault((row["model"], mode), []).append((macs, step / 1e3))
            if row.get(f"{mode}_compile_s") is not None:
                self.compile_s[row["model"], mode] = row[f"{mode}_compile_s"]

    def step_s(self, model: str, mode: str, macs: float) -> float | None:
        """This model's own steps if it has any; else the median MACs/s of the other models' largest steps."""
        if (model, mode) in self.points:
            return extrapolate(self.points[model, mode], macs)
        rates = [x / y for (_, m), pts in self.points.items() if m == mode for x, y in [max(pts)]]
        return macs / float(np.median(rates)) if rates else None

    def mode_s(self, model: str, mode: str, gmacs: float, batch_size: int, plan: Plan) -> float | None:
        """Seconds of one mode: a fresh process, compiling (--compile, as last measured), the warm-up and the timed
        steps of `plan`."""
        step = self.step_s(model, mode, gmacs * 1e9 * batch_size)
        if step is None:
            return None
        return PROCESS_OVERHEAD_S + self.compile_s.get((model, mode), 0.0) + step * sum(plan.steps(step))

    def config_s(self, model: str, gmacs: float, batch_size: int, modes: tuple[str, ...], plan: Plan,
                 count_traces: int = 1) -> float | None:
        """Seconds a configuration takes: the fvcore count (`count_traces` forwards at batch 1; 0: counted already)
        and each mode. None while a mode has nothing to predict from."""
        total = count_traces * (self.step_s(model, "infer", gmacs * 1e9) or 0.0)
        for mode in modes:
            seconds = self.mode_s(model, mode, gmacs, batch_size, plan)
            if seconds is None:
                return None
            total += seconds
        return total


# ---------------------------------------------------------------------------------------------------------------


Counter = Callable[..., dict]
Runner = Callable[[Setup, str, Plan, float | None], dict]


def run_sweep(sweep: Sweep, out: Path, runner: Runner = measure, counter: Counter = count,
              on_row: Callable[[dict], None] | None = None, on_start: Callable[[str, int], None] | None = None
              ) -> list[dict]:
    """Run every (length, model) in order of length, writing each row as it finishes; returns the rows.

    `runner(setup, mode, plan, timeout)` and `counter(prepared)` are `bixt.measure.profile.measure` and `count`
    (tests pass cheap fakes). A mode's fresh process is stopped after 3 x the budget.
    """
    check_sweep(sweep)
    out.mkdir(parents=True, exist_ok=True)
    writer, steps = ResultsWriter(out), StepModel()
    deadline = None if sweep.total_s is None else time.perf_counter() + sweep.total_s
    for n in sorted(sweep.seq_lens):
        for model in sweep.models:
            if on_start:
                on_start(model, n)
            left = sweep.budget_s if deadline is None else min(sweep.budget_s, deadline - time.perf_counter())
            row = run_config(sweep, model, n, steps, runner, counter, max(left, 0.0))
            steps.add(row)
            writer.add(row)
            if on_row:
                on_row(row)
    finish(writer.rows, out, sweep.fit_from)
    return writer.rows


def _skip_all(row: dict, sweep: Sweep, message: str, t0: float) -> dict:
    """The row of a configuration that does not run at all: skipped, every mode too."""
    row.update(status="skipped", message=message)
    for mode in sweep.modes:
        row.update(mode_columns(mode, failure("skipped", "")))
    row["elapsed_s"] = time.perf_counter() - t0
    return row


def run_config(sweep: Sweep, model: str, n: int, steps: StepModel, runner: Runner, counter: Counter,
               budget_s: float) -> dict:
    """One row. Its count runs when one forward fits the budget; each mode runs unless its predicted time, added to
    the time already spent, exceeds the budget (then it is `skipped`, with the prediction in the message)."""
    t0 = time.perf_counter()
    prep = prepare(sweep.setup(model, n))
    row = {**dict.fromkeys(COLUMNS), **describe(prep), "status": "ok", "message": ""}
    for mode in MODES:
        row.update(mode_columns(mode, None))

    def count_into_row() -> None:
        try:
            row.update(counter(prep))
        except Exception as e:  # noqa: BLE001 -- recorded as the row's error; the sweep goes on
            row.update(status="oom" if is_oom(e) else "error",
                       message=f"count: {type(e).__name__}: {_first_line(e)}")  # CUDA's OOM text runs to lines

    closed = analytic_macs(prep.family, prep.config, n, ARCHITECTURE_BACKEND)
    row["gmacs_analytic"] = None if closed is None else closed.total / 1e9
    if closed is None:  # no closed form: the count comes first and is the prediction's basis
        count_into_row()
    gmacs = row["gmacs_analytic"] or row["gmacs"]
    if budget_s <= 0:  # --quick's total is spent: record the rest of the sweep without running it
        return _skip_all(row, sweep, "the sweep's total time budget is spent", t0)
    if gmacs is not None:
        traces = prep.count_traces if closed is not None else 0
        row["predicted_s"] = steps.config_s(model, gmacs, sweep.batch_size, sweep.modes, sweep.plan, traces)
        count_s = traces * (steps.step_s(model, "infer", gmacs * 1e9) or 0.0)
        if count_s > budget_s:
            return _skip_all(row, sweep, f"count: predicted {count_s:.0f} s > budget {budget_s:.0f} s", t0)
        if closed is not None:
            count_into_row()
    results = {}
    for mode in sweep.modes if row["status"] == "ok" else ():
        seconds = None if gmacs is None else steps.mode_s(model, mode, gmacs, sweep.batch_size, sweep.plan)
        spent = time.perf_counter() - t0
        if seconds is not None and spent + seconds > budget_s:
            results[mode] = failure("skipped", f"{mode}: predicted {seconds:.0f} s + {spent:.0f} s spent > "
                                               f"budget {budget_s:.0f} s")
        else:
            try:
                results[mode] = runner(prep.setup, mode, sweep.plan, 3 * sweep.budget_s)
            except Exception as e:  # noqa: BLE001
                results[mode] = failure("oom" if is_oom(e) else "error",
                                        f"{mode}: {type(e).__name__}: {_first_line(e)}")
        row.update(mode_columns(mode, results[mode]))
    bad = [r for r in results.values() if r["status"] != "ok"]
    if bad:  # the row's status: oom, then error, then skipped (oom is the expected failure at long lengths)
        row["status"] = min((r["status"] for r in bad), key=("oom", "error", "skipped").index)
        row["message"] = "; ".join(r["message"] for r in bad)
    row["elapsed_s"] = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------------------------------------------------------
# Exponents, plots, published counts.


def fit_exponent(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope of log y on log x and its R^2: y ~ x^slope."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError("fitting an exponent needs at least two distinct lengths")
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return float(slope), r2


def metric_points(rows: list[dict], model: str, metric: str) -> list[tuple[int, float]]:
    """(length, value) of a model's rows where the metric was measured (its mode ran ok; gmacs: counted)."""
    mode = metric.split("_", 1)[0]
    pts = [(r["seq_len"], r.get(metric)) for r in rows if r["model"] == model
           and (mode not in MODES or r.get(f"{mode}_status") == "ok")]
    return sorted((n, float(v)) for n, v in pts if v is not None and v > 0)


def exponents(rows: list[dict], fit_from: int = 1024) -> list[dict]:
    """Per model and metric: the log-log slope over the lengths >= fit_from that ran (all lengths if fewer than two
    of them did), with R^2 and the range used."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for metric in METRICS:
            pts = metric_points(rows, model, metric)
            use = [p for p in pts if p[0] >= fit_from]
            use = use if len(use) >= 2 else pts
            if len({n for n, _ in use}) < 2:
                continue
            slope, r2 = fit_exponent(*zip(*use, strict=True))
            table.append({"model": model, "metric": metric, "exponent": slope, "r2": r2, "points": len(use),
                          "from_len": use[0][0], "to_len": use[-1][0]})
    return table


PLOTS = {"gmacs.png": ("GMACs per sample", ("gmacs", "gmacs_executed")),
         "memory.png": ("Peak memory over the post-creation baseline (MiB)",
                        ("infer_peak_mem_mib", "train_peak_mem_mib")),
         "throughput.png": ("Throughput (samples/s)", ("infer_samples_per_sec", "train_samples_per_sec"))}
PANEL_TITLES = {"gmacs": "architecture (one similarity matrix per layer)",
                "gmacs_executed": "executed (the backend that ran)"}


def plot(rows: list[dict], exps: list[dict], out: Path) -> list[Path]:
    """Log-log plots against the sequence length, one line per model, its fitted slope in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slope = {(e["model"], e["metric"]): e["exponent"] for e in exps}
    models = list(dict.fromkeys(r["model"] for r in rows))
    written = []
    for name, (ylabel, metrics) in PLOTS.items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            for model in models:
                pts = metric_points(rows, model, metric)
                if pts:
                    k = slope.get((model, metric))
                    label = model if k is None else f"{model} (slope {k:.2f})"
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel=ylabel,
                   title=PANEL_TITLES.get(metric, metric.split("_", 1)[0]) if len(metrics) > 1 else ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    return written


def _ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if a.get(key) and b.get(key) else None


RATIO_COLUMNS = ("model", "seq_len", "infer_speedup", "train_speedup", "infer_mem_ratio", "train_mem_ratio")


def ratios(rows: list[dict]) -> list[dict]:
    """The sweep's first model (BiXT) against each other model at every length both ran: throughput ours / theirs
    (`*_speedup`), peak memory theirs / ours (`*_mem_ratio`); > 1 favours the first model."""
    if not rows:
        return []
    ours = rows[0]["model"]
    by = {(r["model"], r["seq_len"]): r for r in rows}
    table = []
    for r in rows:
        o = by.get((ours, r["seq_len"]))
        if r["model"] == ours or o is None:
            continue
        table.append({"model": r["model"], "seq_len": r["seq_len"],
                      **{f"{m}_speedup": _ratio(o, r, f"{m}_samples_per_sec") for m in MODES},
                      **{f"{m}_mem_ratio": _ratio(r, o, f"{m}_peak_mem_mib") for m in MODES}})
    return table


def finish(rows: list[dict], out: Path, fit_from: int) -> list[dict]:
    """exponents.csv, ratios.csv and the plots of a finished sweep."""
    exps = exponents(rows, fit_from)
    _atomic_write(out / "exponents.csv", rows_to_csv(exps, ("model", "metric", "exponent", "r2", "points",
                                                            "from_len", "to_len")))
    _atomic_write(out / "ratios.csv", rows_to_csv(ratios(rows), RATIO_COLUMNS))
    plot(rows, exps, out)
    return exps


def published_counts(names: tuple[str, ...] | None = None, trace: bool = True) -> list[dict]:
    """Each model with a published figure at its default input, on the `math` backend (plain matmuls, as the
    published counts were made): fvcore's count (`trace`) and the closed form against the published GMACs and
    parameters."""
    rows = []
    for name in names or PUBLISHED:
        if name not in list_models():
            continue
        gmacs, params = PUBLISHED[name]
        prep = prepare(Setup(name, get_entry(name).config.default_tokens, backend="math"))
        closed = analytic_macs(prep.family, prep.config, prep.setup.seq_len, "math").total / 1e9
        counted = profile_trace(prep, "math").total / 1e9 if trace else None
        rows.append({"model": name, "published_gmacs": gmacs, "gmacs": counted, "gmacs_analytic": closed,
                     "rel_err": (counted or closed) / gmacs - 1, "published_params": params,
                     "param_count": prep.param_count})
    return rows


def write_published(out: Path, trace: bool = True) -> list[dict]:
    rows = published_counts(trace=trace)
    _atomic_write(out / "published.csv", rows_to_csv(rows, ("model", "gmacs", "gmacs_analytic", "published_gmacs",
                                                             "rel_err", "param_count", "published_params")))
    return rows
