"""`bixt compare --data`: a thin wrapper over bixt.study.accuracy (the training comparison)."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bixt_cli.app import console, err_console, model_arg_value, parse_model_args
from bixt_cli.measure import _fmt, _table, split_list

SUMMARY = ["model", "setting", "tokens", "seeds", "acc", "accs", "params", "gmacs", "train_samples_per_s", "train_s",
           "peak_mem_mib", "epochs"]


def parse_vary(items: list[str] | None) -> tuple[dict, ...]:
    """`--vary stride=7,4,2 --vary patch_size=7,8,4` -> ({stride: 7, patch_size: 7}, ...): the values of every key
    are zipped, one setting per position, each read as --model-arg reads its value."""
    if not items:
        return ({},)
    columns = {}
    for item in items:
        key, sep, values = (part.strip() for part in item.partition("="))
        if not sep or not key or not values:
            raise ValueError(f"bad --vary {item!r}: use KEY=V1,V2,... (e.g. --vary stride=4,2)")
        if key in columns:
            raise ValueError(f"--vary {key} given twice: give each key once, its values comma-separated")
        columns[key] = [model_arg_value(v.strip()) for v in values.split(",") if v.strip()]
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        counts = ", ".join(f"{k}: {len(v)}" for k, v in columns.items())
        raise ValueError(f"--vary keys have different numbers of values ({counts}): give every key one value per "
                         "setting")
    return tuple({k: v[i] for k, v in columns.items()} for i in range(lengths.pop()))


def study_from_options(data: str, models: str | None, baselines: str | None, batch_size: int | None, quick: bool,
                       device: str | None, amp: bool, epochs: int | None, seeds: int | None, vary: list[str] | None,
                       train_seconds: float | None, train_samples: int | None, test_samples: int | None,
                       lr: float | None, warmup_epochs: float | None, config: Path | None,
                       model_arg: list[str] | None):
    """The Study the options describe: a config file's recipe, then --quick's, then the options given."""
    from bixt.data import build_data
    from bixt.study import accuracy as acc
    from bixt.train import read_config_file

    saved = read_config_file(config) if config else {}
    recipe = {k: v for k, v in saved.items() if k not in acc.PER_RUN}
    if saved.get("model_args"):  # overrides for every model, under each setting's
        recipe["model_args"] = dict(saved["model_args"])
    quick_recipe = {k: v for k, v in acc.QUICK.items() if k != "seeds"} if quick else {}
    given = {"batch_size": batch_size, "device": device, "amp": amp or None, "epochs": epochs,
             "train_samples": train_samples, "test_samples": test_samples, "lr": lr, "warmup_epochs": warmup_epochs}
    recipe = {**recipe, **quick_recipe, **{k: v for k, v in given.items() if v is not None}}
    overrides = parse_model_args(model_arg)
    if overrides:
        recipe["model_args"] = {**recipe.get("model_args", {}), **overrides}
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}: pass how many seeds each model trains with")
    if train_seconds is not None and not 0 < train_seconds < float("inf"):
        raise ValueError(f"--train-seconds must be positive and finite, got {train_seconds}: pass the seconds each "
                         "run may train")
    n_seeds = seeds if seeds is not None else (acc.QUICK["seeds"] if quick else 3)
    modality = build_data(data, need_train=False, augment=False).modality  # which matched models the families mean
    return acc.Study(data, acc.resolve_models(split_list(models), split_list(baselines), modality),
                     parse_vary(vary), tuple(range(n_seeds)), recipe, train_seconds)


def compare_training(data: str, models: str | None, baselines: str | None, batch_size: int | None, out: Path | None,
                     quick: bool, device: str | None, amp: bool, epochs: int | None, seeds: int | None,
                     vary: list[str] | None, train_seconds: float | None, train_samples: int | None,
                     test_samples: int | None, lr: float | None, warmup_epochs: float | None, config: Path | None,
                     model_arg: list[str] | None) -> list[dict]:
    from bixt.study import accuracy as acc
    from bixt.study.plots import PLOTS

    study = study_from_options(data, models, baselines, batch_size, quick, device, amp, epochs, seeds, vary,
                               train_seconds, train_samples, test_samples, lr, warmup_epochs, config, model_arg)
    out = Path(out) if out is not None else Path("results") / f"compare-train-{datetime.now():%Y%m%d-%H%M%S}"
    cells = acc.plan_cells(study)  # every model sized for the data before anything runs or is written
    acc.prepare_out(out, study)
    runs = len(cells) * len(study.seeds)
    budget = (f"{study.train_seconds:.0f} s each" if study.train_seconds else
              f"{study.config(cells[0].model, cells[0].setting, 0).epochs} epochs")
    console.print(f"[bold]bixt compare --data[/]: {escape(', '.join(study.models))} on {escape(data)}, "
                  f"{len(study.settings)} setting(s) x {len(study.seeds)} seed(s) = {runs} runs, {budget} -> "
                  f"{escape(str(out))}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        total = bar.add_task("runs", total=runs)
        epoch = bar.add_task("epochs", total=1)

        def on_start(row: dict, epochs: int) -> None:
            bar.reset(epoch, total=epochs, description=f"{row['model']} ({row['setting']}) seed {row['seed']}")

        def on_row(row: dict) -> None:
            bar.advance(total)
            if row.get("test_miou") is not None:  # a dense task: its score is the mIoU
                acc_text = f"mIoU {100 * row['test_miou']:.2f} %"
            else:
                acc_text = "-" if row.get("test_acc") is None else f"{100 * row['test_acc']:.2f} %"
            bar.console.print(f"  {row['model']:<20} {row['setting']:<24} seed {row['seed']}  {row['status']:<6} "
                              f"test {acc_text}  {_fmt(row.get('train_s'))} s  {row.get('message') or ''}",
                              highlight=False, markup=False)

        try:
            rows = acc.run_study(study, out, on_start=on_start, on_epoch=lambda n: bar.update(epoch, completed=n),
                                 on_row=on_row)
        except KeyboardInterrupt:  # the finished runs are in results.*, the one under way in its checkpoint
            bar.stop()
            err_console.print(f"stopped: the finished runs are kept in {out / 'results.csv'}; the same command "
                              "continues the study", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
    table = acc.summarize(rows)
    dense = any("miou_mean" in row for row in table)
    for row in table:
        for name in ("acc", "miou", "instance_miou"):
            if f"{name}_mean" in row:
                std = "" if row[f"{name}_std"] is None else f" +- {100 * row[f'{name}_std']:.2f}"
                row[name] = f"{100 * row[f'{name}_mean']:.2f}{std}"
    columns = [c for c in SUMMARY if c != "accs"] if dense else SUMMARY
    if dense:
        columns[columns.index("acc"):columns.index("acc")] = ["miou", "instance_miou"]
    title = ("test mIoU and per-token accuracy %" if dense else "test top-1 %") + \
        " (mean +- unbiased std over seeds" + ("" if dense else "; each seed's in accs") + ")"
    console.print(_table(title, table, columns))
    console.print("gmacs: the architecture's count per sample; train_s: training time per run, evaluation included; "
                  "peak_mem_mib: the run's process (RSS on a CPU).")
    console.print(f"written to {out}: study.json, recipe.json, results.csv, results.json, summary.csv, "
                  f"{', '.join(PLOTS)}, runs/", markup=False)
    return rows
