"""`bixt profile` and `bixt compare`: thin wrappers over bixt.measure.profile and bixt.measure.compare."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand

from bixt_cli.app import MODEL_ARG_HELP, app, console, parse_model_args, user_errors

# --vary is left out: it repeats, each KEY=V1,V2 holding commas of its own.
LIST_OPTIONS = ("--models", "--baselines", "--seq-lens")
GMACS_NOTE = ("gmacs: the architecture's count, one similarity matrix per layer as published, whatever the backend; "
              "gmacs_executed: what the backend that ran computes, counted on macs_backend (sdpa builds BiXT's "
              "similarity matrix twice).")
AMP_HELP = ("Run the steps under autocast (bf16; fp16 on a GPU without bf16) with fp32 weights; on a CPU it needs "
            "AVX512-BF16 or AMX. Unlike --dtype, which casts the weights.")
CHECKPOINT_HELP = ("Training recomputes each layer's activations in backward (gradient checkpointing): less memory, "
                   "about one more forward of time.")
COMPILE_HELP = ("Run the model torch.compile'd (inductor; on a CPU it needs g++): the first step compiles, and its "
                "time is reported apart as *_compile_s, out of the step times and memory.")


def join_list_values(args: list[str], options: tuple[str, ...] = LIST_OPTIONS) -> list[str]:
    """`--baselines vit perceiver` -> `--baselines vit,perceiver`: click options take one value each."""
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        i += 1
        if out[-1] in options:
            values = []
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
            if values:
                out.append(",".join(values))
    return out


class ListOptions(TyperCommand):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, join_list_values(list(args)))


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_lengths(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        lengths = tuple(int(v) for v in split_list(value))
    except ValueError:
        raise ValueError(f"--seq-lens must be comma-separated integers, got {value!r}: e.g. 256,1024,4096") from None
    bad = [n for n in lengths if n <= 0]
    if bad:
        raise ValueError(f"--seq-lens must be positive, got {bad[0]}: pass numbers of tokens >= 1")
    return lengths


def parse_modes(mode: str) -> tuple[str, ...]:
    modes = {"infer": ("infer",), "train": ("train",), "both": ("infer", "train")}
    if mode not in modes:
        raise ValueError(f"unknown --mode {mode!r}: choose infer, train or both")
    return modes[mode]


def _refuse(options: dict, what: str) -> None:
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise ValueError(f"{given[0]} is one of {what}: drop it or change the mode")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} x{v}" for k, v in value.items()) or "none"
    return str(value)


def _table(title: str, rows: list[dict], columns: list[str]) -> Table:
    """Cells and title are printed literally: messages and paths may hold brackets, which rich reads as markup."""
    table = Table(title=escape(title), header_style="bold")
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "metric", "status", "message") else "right",
                         overflow="fold")
    for row in rows:
        table.add_row(*(escape(_fmt(row.get(c))) for c in columns))
    return table


@app.command()
@user_errors
def profile(
    model: str = typer.Option(..., "--model", "-m", help="Registered model name (see `bixt models`)."),
    seq_len: int = typer.Option(None, help="Tokens per sample; images: a square grid (side = sqrt(N) x stride). "
                                           "Default: the model's default input."),
    img_size: int = typer.Option(None, help="Image models: the image side instead of --seq-len."),
    batch_size: int = typer.Option(1, help="Samples per step for memory and throughput (MACs are per sample)."),
    mode: str = typer.Option("both", help="infer, train or both."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    amp: bool = typer.Option(False, "--amp", help=AMP_HELP),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help=CHECKPOINT_HELP),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    backend: str = typer.Option(None, help="Attention backend (math, sdpa, xformers, auto...); default: the model's."),
    quick: bool = typer.Option(False, help="Shorter warm-up and timing (noisier)."),
    shard_tokens: int = typer.Option(None, "--shard-tokens", metavar="P",
                                     help="Under torchrun with P processes: each holds 1/P of the tokens (BiXT); "
                                          "reports every process's peak memory, step time and bytes all-reduced."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout instead of the table."),
    model_arg: list[str] = typer.Option(None, "--model-arg", metavar="KEY=VALUE", help=MODEL_ARG_HELP),
):
    """Parameters, GMACs (fvcore and closed form), peak memory and throughput of one model at one input size."""
    from bixt.measure.profile import DEFAULT_PLAN, QUICK_PLAN, Setup, profile, tokens_for

    if seq_len is not None and seq_len <= 0:  # named as the option here; Setup's check names the concept
        raise ValueError(f"--seq-len must be positive, got {seq_len}: pass a number of tokens >= 1")
    overrides = parse_model_args(model_arg)
    setup = Setup(model, tokens_for(model, seq_len, img_size, overrides), batch_size, device, dtype, backend,
                  tuple(overrides.items()), grad_checkpointing=grad_checkpointing, amp=amp, compile=compile_)
    if shard_tokens is not None:
        _profile_sharded(setup, shard_tokens, parse_modes(mode), QUICK_PLAN if quick else DEFAULT_PLAN, as_json)
        return
    report = profile(setup, parse_modes(mode), QUICK_PLAN if quick else DEFAULT_PLAN)
    if as_json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
        return
    rows = [{"metric": k, "value": v} for k, v in report.items()
            if not k.endswith(("_message", "_compile_s")) or v is not None and v != ""]
    console.print(_table(f"{model} at {setup.seq_len} tokens, batch {batch_size}", rows, ["metric", "value"]))
    console.print(GMACS_NOTE)


SHARDED_COLUMNS = ["mode", "rank", "tokens", "peak_mem_mib", "step_ms", "comm_bytes_per_step",
                   "model_comm_bytes_per_layer", "grad_comm_bytes_per_step", "iters"]


def _profile_sharded(setup, shard: int, modes: tuple[str, ...], plan, as_json: bool) -> None:
    from bixt.measure.sharded import profile_sharded

    rows = profile_sharded(setup, shard, modes, plan)
    if int(os.environ.get("RANK", "0")):  # rank 0 reports for all
        return
    if as_json:
        json.dump(rows, sys.stdout)
        sys.stdout.write("\n")
        return
    console.print(_table(f"{setup.model} at {setup.seq_len} tokens, batch {setup.batch_size}, {shard} process(es) "
                         f"sharing the tokens", rows, SHARDED_COLUMNS))
    console.print("bytes: the payload each process all-reduces per step (model: the latents' softmax statistics and "
                  "their gradient, constant in the tokens; grad: the mean of the parameter gradients).")


@app.command(cls=ListOptions)
@user_errors
def compare(
    models: str = typer.Option(None, help="BiXT models (space or comma separated); default bixt_ti_l64_p16 "
                                          "(with --data: bixt_cpu)."),
    baselines: str = typer.Option("vit,perceiver", help="Families (their default model; with --data their matched "
                                                        "CPU-sized one, bixt-ablation too) or model names."),
    seq_lens: str = typer.Option(None, help="Sequence lengths, e.g. 256,1024,4096,16384 (the default)."),
    batch_size: int = typer.Option(None, help="Samples per step, the same for every model (default 1; with --data "
                                              "the training batch, default 64)."),
    budget_s: float = typer.Option(None, help="Seconds one configuration may take (predicted); default 300."),
    out: Path = typer.Option(None, help="Output folder; default results/compare-<timestamp>/. With --data, an "
                                        "earlier folder of the same study continues it."),
    quick: bool = typer.Option(False, help="Lengths 256,1024,4096, short timing, 20 s per configuration and 150 s "
                                           "in all: a few minutes at most. With --data: 2 seeds, 5 epochs, 1024 "
                                           "training and 256 test samples."),
    mode: str = typer.Option(None, help="infer, train or both (default both)."),
    device: str = typer.Option(None, help="cpu or cuda (default cpu; with --data: cuda when available)."),
    dtype: str = typer.Option(None, help="fp32, bf16 or fp16 (default fp32)."),
    amp: bool = typer.Option(False, "--amp", help=AMP_HELP),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help=CHECKPOINT_HELP),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    backend: str = typer.Option(None, help="Attention backend for every model; default: each model's own."),
    fit_from: int = typer.Option(None, help="Fit exponents over the lengths >= this (all if fewer than two; "
                                            "default 1024)."),
    timing: str = typer.Option(None, help="short or full warm-up and timing per mode (default: short with --quick, "
                                          "else full); short suits GPUs, whose steps take milliseconds."),
    data: str = typer.Option(None, help="Train and test every model on this data spec (see `bixt train --help`): "
                                        "accuracy (mean +- std over seeds) against cost, instead of the cost sweep."),
    epochs: int = typer.Option(None, help="--data: epochs per run, the same for every model (default 40)."),
    seeds: int = typer.Option(None, help="--data: seeds per model, 0..N-1 (default 3)."),
    vary: list[str] = typer.Option(None, "--vary", metavar="KEY=V1,V2,...",
                                   help="--data: the token-count axis, a model-config field and its values (e.g. "
                                        "stride=4,2; repeat for fields that change together, zipped)."),
    train_seconds: float = typer.Option(None, "--train-seconds",
                                        help="--data: equal wall clock instead of equal epochs: each model trains "
                                             "the whole epochs its measured step fits into this many seconds."),
    train_samples: int = typer.Option(None, "--train-samples", metavar="N",
                                      help="--data: a fixed subset of N training samples, the same for every run."),
    test_samples: int = typer.Option(None, "--test-samples", metavar="N",
                                     help="--data: a fixed subset of N test samples, the same for every run."),
    lr: float = typer.Option(None, help="--data: peak learning rate of every run (default 0.002)."),
    warmup_epochs: float = typer.Option(None, "--warmup-epochs", help="--data: warm-up epochs (default 3, capped at "
                                                                      "half the run)."),
    config: Path = typer.Option(None, "--config", help="--data: a TOML or YAML training config, the recipe every "
                                                       "run shares (as `bixt train --config`)."),
    model_arg: list[str] = typer.Option(None, "--model-arg", metavar="KEY=VALUE",
                                        help="--data: a model-config override for every model (repeatable)."),
):
    """BiXT against baselines at growing sequence lengths: GMACs, memory, throughput, fitted exponents, plots.
    With --data: every model trained and tested on that data (same recipe, seeds and data order): test accuracy,
    mean +- std over seeds, against GMACs, training time and memory."""
    given = {"--seq-lens": seq_lens, "--budget-s": budget_s, "--mode": mode, "--dtype": dtype, "--backend": backend,
             "--fit-from": fit_from, "--timing": timing, "--grad-checkpointing": grad_checkpointing or None,
             "--compile": compile_ or None}
    training = {"--epochs": epochs, "--seeds": seeds, "--vary": vary or None, "--train-seconds": train_seconds,
                "--train-samples": train_samples, "--test-samples": test_samples, "--lr": lr,
                "--warmup-epochs": warmup_epochs, "--config": config, "--model-arg": model_arg or None}
    if data is not None:
        from bixt_cli.study import compare_training

        _refuse(given, "the cost sweep's (without --data)")
        compare_training(data, models, baselines, batch_size, out, quick, device, amp, epochs, seeds, vary,
                         train_seconds, train_samples, test_samples, lr, warmup_epochs, config, model_arg)
        return
    _refuse(training, "training options: add --data SPEC to train")
    batch_size, mode, device = 1 if batch_size is None else batch_size, mode or "both", device or "cpu"
    dtype, fit_from = dtype or "fp32", 1024 if fit_from is None else fit_from
    from bixt.measure import compare as cmp
    from bixt.measure.profile import DEFAULT_PLAN, QUICK_PLAN

    names = cmp.resolve_models(split_list(models), split_list(baselines))
    lengths = parse_lengths(seq_lens) or (cmp.QUICK["seq_lens"] if quick else cmp.DEFAULT_SEQ_LENS)
    budget = budget_s if budget_s is not None else (cmp.QUICK["budget_s"] if quick else cmp.Sweep.budget_s)
    if timing not in (None, "short", "full"):
        raise ValueError(f"unknown --timing {timing!r}: choose short or full")
    short = timing == "short" or (timing is None and quick)
    sweep = cmp.Sweep(names, lengths, batch_size, device, dtype, backend, budget, parse_modes(mode),
                      QUICK_PLAN if short else DEFAULT_PLAN, fit_from, cmp.QUICK["total_s"] if quick else None,
                      grad_checkpointing=grad_checkpointing, amp=amp, compile=compile_)
    cmp.check_sweep(sweep)
    out = cmp.prepare_out(out)
    console.print(f"[bold]bixt compare[/]: {', '.join(names)} at {', '.join(map(str, sorted(lengths)))} tokens, "
                  f"batch {batch_size}, {device} {dtype}{' amp' if amp else ''}"
                  f"{', grad checkpointing' if grad_checkpointing else ''}{', compiled' if compile_ else ''}, "
                  f"budget {budget:.0f} s per configuration -> "
                  f"{escape(str(out))}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("starting", total=len(names) * len(lengths))

        def on_row(row: dict) -> None:
            bar.advance(task)
            bar.console.print(f"  {row['model']:<22} {row['seq_len']:>6}  {row['status']:<7} "
                              f"GMACs {_fmt(row['gmacs'])} (executed {_fmt(row['gmacs_executed'])} on "
                              f"{row['macs_backend'] or '-'})  infer {_fmt(row['infer_samples_per_sec'])} samples/s"
                              f"  {row['message']}", highlight=False, markup=False)

        rows = cmp.run_sweep(sweep, out, on_row=on_row,
                             on_start=lambda m, n: bar.update(task, description=f"{m} @ {n} tokens"))
    console.print(_table("results", rows,
                         ["model", "seq_len", "status", "gmacs", "gmacs_analytic", "gmacs_executed", "macs_backend",
                          "infer_samples_per_sec", "infer_peak_mem_mib", "infer_act_mem_mib", "train_step_ms",
                          "train_peak_mem_mib", *(("infer_compile_s", "train_compile_s") if compile_ else ()),
                          "predicted_s", "message"]))
    console.print(GMACS_NOTE)
    exps = cmp.exponents(rows, fit_from)
    console.print(_table(f"fitted exponents (log-log slope vs length, lengths >= {fit_from} where possible)", exps,
                         ["model", "metric", "exponent", "r2", "points", "from_len", "to_len"]))
    console.print(_table(f"{names[0]} vs each model (ratio of throughput; of memory: theirs / ours)",
                         cmp.ratios(rows), ["model", "seq_len", "infer_speedup", "train_speedup",
                                            "infer_mem_ratio", "train_mem_ratio"]))
    title = "published counts (math backend, default input; " + ("closed form only: --quick)" if quick else
                                                                    "fvcore and closed form)")
    console.print(_table(title, cmp.write_published(out, trace=not quick),
                         ["model", "gmacs", "gmacs_analytic", "published_gmacs", "rel_err", "param_count",
                          "published_params"]))
    console.print(f"written to {out}: results.csv, results.json, exponents.csv, ratios.csv, published.csv, "
                  f"{', '.join(cmp.PLOTS)}", markup=False)
