"""`bixt tune`: measure the fastest attention backend per shape on this machine and cache it for `auto`."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bixt_cli.app import app, console, user_errors


@app.command()
@user_errors
def tune(
    quick: bool = typer.Option(False, "--quick", help="Three small shapes, two repeats: a smoke test, not a tuning."),
    out: Path = typer.Option(None, "--out", help="Also write the result (table and thresholds) to this JSON file."),
    no_cache: bool = typer.Option(False, "--no-cache", "--dry-run", help="Measure only; leave the cache as it is."),
    show: bool = typer.Option(False, "--show", help="Print what `auto` uses here now and its source; measure "
                                                    "nothing."),
    repeats: int = typer.Option(None, "--repeats", help="Timed calls per backend and shape (median); default 9, "
                                                        "2 with --quick."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, or bf16: the attention under --amp (bf16 autocast), "
                                                      "tuned and cached apart."),
):
    """Time the sdpa, math and fused attention backends at 15 shapes from 256 to 65,536 tokens on this CPU, cache
    the fastest per shape for `auto` on this machine (with fp32, also the faster library for Linears: oneDNN or
    MKL), then check auto's choices on a second measurement at shapes it was not tuned on (about a minute on 2
    cores)."""
    from bixt.measure import tune as t

    if show:
        _show(t.current())
        return
    if repeats is not None and repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}: e.g. --repeats 9")
    torch_dtype = t.tuned_dtype(dtype)
    lengths, check = (t.QUICK_LADDER, t.QUICK_CHECK_LADDER) if quick else (t.LADDER, t.CHECK_LADDER)
    repeats = repeats or (t.QUICK_REPEATS if quick else t.REPEATS)
    load = t.load_average()
    if t.busy(load):
        console.print(f"warning: the machine is busy (load average {load:.1f} on {t.cores()} cores): timings are "
                      "noisy and the choices may be off; rerun `bixt tune` when it is idle", highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("starting", total=(len(lengths) + len(check)) * len(t.MODES))
        offset = [0]

        def progress(done: int, total: int, label: str) -> None:
            if label == "done":  # the tuning's measurement is over, the check's begins
                offset[0] += total
            bar.update(task, completed=offset[0] + (0 if label == "done" else done), description=label)

        result = t.tune(lengths=lengths, repeats=repeats, progress=progress, write_cache=not no_cache,
                        check_lengths=check, dtype=torch_dtype,
                        linear_shapes=t.QUICK_LINEAR_SHAPES if quick else t.LINEAR_SHAPES)
    for mode in t.MODES:
        console.print(_table(f"{mode}: tuned", mode, result["rows"][mode]))
    for mode, rows in result["check"].items():  # none where the check ladder is empty
        console.print(_table(f"{mode}: check, a second measurement", mode, rows))
    if result["linear"] is not None:
        secs = result["linear"]["seconds"]
        console.print("float32 Linears (BiXT-Ti's token MLP), train / infer ms: " + "; ".join(
            f"{lib} {s['train'] * 1e3:.1f} / {s['infer'] * 1e3:.1f}" for lib, s in secs.items())
            + f": {result['linear']['faster']} is faster", highlight=False)
    if result["worst_auto_over_best_in_check"] is not None:
        console.print(f"worst auto / best in the check: {result['worst_auto_over_best_in_check']:.3f}",
                      highlight=False)
    if out is not None:
        from bixt.io.atomic import atomic_write

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
        console.print(f"written {escape(str(out))}", highlight=False)
    if result["cache"] is None:
        console.print("not cached (--no-cache): auto is unchanged", highlight=False)
    else:
        console.print(f"cached in {escape(result['cache'])}; auto reads it on this machine", highlight=False)


def _table(title: str, mode: str, rows: list[dict]) -> Table:
    what = "forward + backward" if mode == "train" else "inference forward"
    table = Table(title=f"{title} ({what}, median ms)", header_style="bold")
    for col in ("B x N", "tokens", "sdpa ms", "math ms", "fused ms", "auto picks", "auto/best"):
        table.add_column(col, justify="left" if col == "auto picks" else "right")
    for r in rows:
        table.add_row(f"{r['batch']} x {r['tokens']}", f"{r['batch_tokens']:,}",
                      *(f"{r[b] * 1e3:.2f}" for b in ("sdpa", "math", "fused")), r["chosen"],
                      f"{r['auto_over_best']:.3f}")
    return table


def _show(info: dict) -> None:
    console.print(f"cache file {escape(info['cache'])}", highlight=False)
    console.print(f"float32 Linears on {info['linear']} (source: {info['linear_source']})", highlight=False)
    for name, now in info["dtypes"].items():
        console.print(f"{name}: machine {escape(now['machine'])}; source: {now['source']}", highlight=False)
        if now["choices"] is None and name == "bf16":
            rule = info["builtin_bf16"]
            console.print(f"  auto: with a backward pass math below {rule['train_math_below']:,} tokens per sample, "
                          f"fused from there; without, fused from {rule['infer_fused_from']:,} tokens, math for "
                          f"{rule['infer_math_from_batch']} or more shorter samples, else sdpa", highlight=False)
            continue
        if now["choices"] is None:
            fused = info["builtin_fused_from"]
            console.print(f"  auto: fused from {fused['train']:,} tokens in the batch with a backward pass, from "
                          f"{fused['infer']:,} without; sdpa below", highlight=False)
            continue
        for mode, rows in now["choices"].items():
            console.print(f"  auto, {mode}: " + ", ".join(f"{b} x {n}: {backend}" for b, n, backend in rows),
                          highlight=False)
        if now["entry"] is not None:
            console.print(f"  measured {now['entry'].get('measured_at', '?')} by "
                          f"{escape(str(now['entry'].get('how', '?')))}", highlight=False)
