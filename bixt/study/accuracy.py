"""The training comparison behind `bixt compare --data`: every model trained and tested on the same data, with the
same recipe and the same seeds, at one or more token counts.

A study is a grid of runs: each setting (model-config overrides that set the token count, e.g. stride=4 then
stride=2) x each seed x each model. Every run is `bixt.train.train` in a fresh Python process (its own peak memory,
and a crash or OOM is one row, not the end of the sweep), writing its run folder under `runs/`. The same seed gives
every model the same data order and augmentation (both are drawn from (seed, epoch, sample)); a subset
(`train_samples`, `test_samples`) is one fixed draw, the same for every run. The test split is never used to choose
anything: the accuracy reported is the last epoch's.

Equal epochs (the recipe's), or equal wall clock (`train_seconds`): each model and setting then trains for the whole
epochs that its measured training step (forward and backward at the recipe's batch, `bixt.measure.profile.measure`)
fits into the seconds given, so the learning-rate schedule still runs to its end.

Output folder: study.json (what was asked), recipe.json (the training options every run shares, defaults
resolved), results.csv / results.json (one row per run, rewritten after each run,
so a killed study keeps what finished; running the same study into the same folder again skips those runs),
summary.csv (per model and token count: mean, unbiased std and each seed's accuracy, and the costs), and the plots of
`bixt.study.plots`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bixt.data import build_data, parse_spec, take
from bixt.io.atomic import atomic_write
from bixt.measure import compare
from bixt.measure.compare import ResultsWriter, rows_to_csv
from bixt.measure.flops import ARCHITECTURE_BACKEND, analytic_macs
from bixt.measure.profile import (
    QUICK_PLAN,
    Setup,
    count,
    fresh_env,
    fresh_python,
    measure,
    prepare,
    worker_failure,
)
from bixt.models.registry import count_params, get_entry
from bixt.nn.allocator import tune_allocator
from bixt.train import TrainConfig, rundir
from bixt.train.build import build_for_data
from bixt.train.config import data_recipe

# The matched CPU-sized models a family stands for in a training comparison, per input modality: same width, depth,
# heads, latents and tokens, so that the attention pattern is what differs (bixt_configs.CPU_MATCHED; points: the
# sizes of bixt_shapes). The first row's model is the default --models.
FAMILY_DEFAULTS = {
    "image": {"bixt": ("bixt_cpu",), "bixt-ablation": ("bixt_cpu_sequential", "bixt_cpu_iterative"),
              "vit": ("vit_cpu",), "perceiver": ("perceiver_cpu",)},
    "points": {"bixt": ("bixt_shapes",), "bixt-ablation": ("bixt_shapes_sequential", "bixt_shapes_iterative"),
               "vit": ("vit_shapes",), "perceiver": ("perceiver_shapes",)},
}
DEFAULT_MODEL = FAMILY_DEFAULTS["image"]["bixt"][0]
# Recipe fields a study sets per run, not per study.
PER_RUN = ("model", "seed", "out", "model_args", "resume")
# --quick: minutes on 2 cores, for a first look and the tests.
QUICK = {"seeds": 2, "epochs": 5, "train_samples": 1024, "test_samples": 256, "warmup_epochs": 1.0}
COLUMNS = ("model", "family", "setting", "tokens", "seed", "status", "message", "test_acc", "test_top5", "test_loss",
           "test_miou", "test_instance_miou", "train_acc", "epochs", "params", "gmacs", "train_samples_per_s",
           "train_s", "wall_s", "peak_mem_mib", "mem_kind", "run")
# Dense tasks: acc is per labelled token (point, pixel), and miou (class-mean IoU) is the score the plots show.
SUMMARY_COLUMNS = ("model", "family", "setting", "tokens", "seeds", "acc_mean", "acc_std", "accs", "miou_mean",
                   "miou_std", "mious", "instance_miou_mean", "instance_miou_std", "params", "gmacs",
                   "train_samples_per_s", "train_s", "peak_mem_mib", "epochs")


@dataclasses.dataclass(frozen=True)
class Study:
    """What a training comparison runs. `recipe`: TrainConfig fields shared by every run (`data` is set from here;
    `model_args` holds overrides applied to every model, under each setting's); `settings`: one dict of model-config
    overrides per token count ({} : the models' own)."""

    data: str
    models: tuple[str, ...] = (DEFAULT_MODEL, "vit_cpu", "perceiver_cpu")
    settings: tuple[dict, ...] = ({},)
    seeds: tuple[int, ...] = (0, 1, 2)
    recipe: dict = dataclasses.field(default_factory=dict)
    train_seconds: float | None = None  # equal wall clock instead of the recipe's epochs

    def config(self, model: str, setting: dict, seed: int, out: Path | None = None, epochs: int | None = None
               ) -> TrainConfig:
        """One run's TrainConfig (checked: a bad recipe fails here, before anything runs)."""
        args = {**self.recipe.get("model_args", {}), **setting}
        extra = {} if epochs is None else {"epochs": epochs}
        return TrainConfig(**{**data_recipe(self.data), **self.recipe, "model_args": args, "data": self.data,
                              "model": model, "seed": seed, "out": None if out is None else str(out), **extra})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "models": list(self.models), "settings": list(self.settings),
                "seeds": list(self.seeds)}


def resolve_models(models: list[str] | None, baselines: list[str] | None, modality: str = "image"
                   ) -> tuple[str, ...]:
    """--models (default: the modality's matched BiXT) plus --baselines: a family (its matched CPU-sized model for
    the data's modality) or a model name."""
    if not models and modality not in FAMILY_DEFAULTS:
        raise ValueError(f"no matched CPU-sized models for {modality} data: name the models with --models (and the "
                         "baselines by model name)")
    return compare.resolve_models(models, baselines, FAMILY_DEFAULTS.get(modality, {}), f"{modality} data")


# ---------------------------------------------------------------------------------------------------------------
# What each (model, setting) is: checked once before anything runs.


@dataclasses.dataclass(frozen=True)
class Cell:
    """One model at one setting: the config training will build (sized for the data), its token count and costs."""

    model: str
    family: str
    setting: dict
    model_args: dict  # what training passes on top of the registry's config, the data's classes and channels included
    tokens: int
    params: int
    gmacs: float | None  # the architecture's count per sample (one similarity matrix per layer), closed form or fvcore

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.setting.items()) or "-"


def plan_cells(study: Study) -> list[Cell]:
    """Every (model, setting) checked against the data (modality, sizes) and costed; raises on the first bad one."""
    if not study.models or not study.settings or not study.seeds:
        raise ValueError("nothing to compare: give at least one model, one setting and one seed")
    samples = {what: study.recipe.get(f"{what}_samples") for what in ("train", "test")}
    if any(samples.values()):  # a subset larger than the data would fail every run: refuse it once, here
        data = build_data(parse_spec(study.data), augment=False)
        for what, n in samples.items():
            take(getattr(data, what), n, what)
    cells = []
    for setting in study.settings:
        for model in study.models:
            cfg = study.config(model, setting, study.seeds[0])
            mcfg, _, args = build_for_data(model, dict(cfg.model_args), cfg.data, need_train=False)
            entry = get_entry(model)
            tokens = mcfg.default_tokens
            closed = analytic_macs(entry.family, mcfg, tokens, ARCHITECTURE_BACKEND)
            if closed is not None:
                gmacs = closed.total / 1e9
            else:  # no closed form: fvcore's count of one forward
                gmacs = count(prepare(Setup(model, tokens, overrides=tuple(args.items()))))["gmacs"]
            cells.append(Cell(model, entry.family, setting, args, tokens, count_params(model, **args), gmacs))
    return cells


def epochs_for(study: Study, cell: Cell, train_size: int, measurer=measure) -> int:
    """Equal wall clock: the whole epochs whose training steps (measured at the recipe's batch) fit the budget."""
    cfg = study.config(cell.model, cell.setting, study.seeds[0])
    setup = Setup(cell.model, cell.tokens, cfg.batch_size, cfg.device or "cpu",
                  overrides=tuple(cell.model_args.items()), amp=cfg.amp)
    result = measurer(setup, "train", QUICK_PLAN)
    if result["status"] != "ok":
        raise ValueError(f"cannot time {cell.model} ({cell.label}) for --train-seconds: {result['message']}")
    epoch_s = result["step_ms"] / 1e3 * (train_size // cfg.batch_size)
    return max(1, math.floor(study.train_seconds / epoch_s))


# ---------------------------------------------------------------------------------------------------------------
# Running.

Runner = Callable[[TrainConfig, Callable[[int], None] | None], dict]


def run_training(cfg: TrainConfig, on_epoch: Callable[[int], None] | None = None) -> dict:
    """One run in a fresh Python process; its result row fields, never raising for a failed run (status error)."""
    run = Path(cfg.out)
    # A run a stopped study left behind continues from its checkpoint (exactly); one without a checkpoint restarts.
    resume = (run / rundir.STATE).is_file()
    if run.exists() and not resume:
        shutil.rmtree(run)
    start = time.perf_counter()
    payload = json.dumps({"options": cfg.to_dict(), "resume": str(run) if resume else None})
    proc = subprocess.Popen(fresh_python("bixt.study.accuracy", payload), env=fresh_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    done = 0
    try:
        while proc.poll() is None:  # the epochs finished so far, from the run's metrics.csv, for the progress bar
            time.sleep(0.5)
            now = _epochs_done(run)
            if on_epoch and now != done:
                done = now
                on_epoch(done)
    except KeyboardInterrupt:  # let the run save its checkpoint (it stops at its next step), then stop the study
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        raise
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else worker_failure(proc.returncode, err)
    return {**result, "wall_s": wall}


def _epochs_done(run: Path) -> int:
    try:
        return max(0, len((run / "metrics.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def _worker(payload: dict) -> dict:
    """The fresh process: train, then the fields of the row that only it knows."""
    from bixt.train import train

    options = payload["options"]
    result = train(None, resume=payload["resume"]) if payload["resume"] else train(options)
    last = result.last
    device = torch.device(options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocated"
    else:  # ru_maxrss: KiB on Linux; the whole process, Python and torch included
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS"
    return {"status": "ok" if result.status == "finished" else result.status, "message": "",
            "test_acc": last.get("test_acc"), "test_top5": last.get("test_top5"), "test_loss": last.get("test_loss"),
            "test_miou": last.get("test_miou"), "test_instance_miou": last.get("test_instance_miou"),
            "train_acc": last.get("train_acc"), "epochs": result.epochs_done,
            "train_samples_per_s": result.samples_per_s, "train_s": result.seconds, "peak_mem_mib": peak,
            "mem_kind": kind}


def prepare_out(out: Path, study: Study) -> list[dict]:
    """The study folder: new, or one holding this very study (its finished rows are returned and kept)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder path")
    saved = out / "study.json"
    if saved.exists():
        try:
            same = json.loads(saved.read_text()) == json.loads(json.dumps(study.to_dict()))
        except (OSError, ValueError):
            same = False
        if not same:
            raise ValueError(f"--out {out} holds another study (study.json differs): give a new folder, or the same "
                             "options to continue it")
        try:
            return [r for r in json.loads((out / "results.json").read_text()) if r["status"] == "ok"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty: give a new or empty folder")
    return []


def run_study(study: Study, out: Path, runner: Runner = run_training, measurer=measure,
              on_start: Callable[[dict, int], None] | None = None, on_epoch: Callable[[int], None] | None = None,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every (setting, seed, model), seed by seed so that a stopped study has whole seeds; returns the rows.

    `runner(cfg, on_epoch)` trains one run (tests pass a fake); `on_start(row, epochs)` before each run.
    """
    cells = plan_cells(study)
    kept = prepare_out(out, study)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "study.json", (json.dumps(study.to_dict(), indent=1) + "\n").encode())
    shared = {k: v for k, v in study.config(cells[0].model, {}, study.seeds[0]).to_dict().items() if k not in PER_RUN}
    atomic_write(out / "recipe.json", (json.dumps(shared, indent=1) + "\n").encode())  # every default resolved
    writer = ResultsWriter(out, COLUMNS)
    for row in kept:
        writer.add(row)
    done = {(r["model"], r["setting"], r["seed"]) for r in kept}
    epochs = {}
    if study.train_seconds is not None:
        train_size = study.recipe.get("train_samples") or _train_size(study)
        epochs = {(c.model, c.label): epochs_for(study, c, train_size, measurer) for c in cells}
    for setting in study.settings:
        for seed in study.seeds:
            for cell in (c for c in cells if c.setting == setting):
                if (cell.model, cell.label, seed) in done:
                    continue
                n = epochs.get((cell.model, cell.label))
                folder = out / "runs" / f"{cell.model}-{_slug(cell.label)}-seed{seed}"
                cfg = study.config(cell.model, setting, seed, folder, n)
                row = {**dict.fromkeys(COLUMNS), "model": cell.model, "family": cell.family, "setting": cell.label,
                       "tokens": cell.tokens, "seed": seed, "epochs": cfg.epochs, "params": cell.params,
                       "gmacs": cell.gmacs, "run": str(folder.relative_to(out))}
                if on_start:
                    on_start(row, cfg.epochs)
                row.update(runner(cfg, on_epoch))
                writer.add(row)
                if on_row:
                    on_row(row)
    finish(writer.rows, out)
    return writer.rows


def _train_size(study: Study) -> int:
    return len(build_data(parse_spec(study.data), augment=False).train)


def _slug(label: str) -> str:
    return "default" if label == "-" else label.replace(", ", "_").replace("=", "")


# ---------------------------------------------------------------------------------------------------------------
# Summary.


def summarize(rows: list[dict]) -> list[dict]:
    """Per model and setting, over the seeds that finished: mean and unbiased std (n - 1) of the test accuracy (and
    of the mIoUs of a dense task), each seed's, and the mean costs (peak memory: the largest)."""
    table = []
    for key in dict.fromkeys((r["model"], r["setting"]) for r in rows):
        ok = [r for r in rows if (r["model"], r["setting"]) == key and r["status"] == "ok"]
        if not ok:
            continue
        first = ok[0]
        row = {"model": first["model"], "family": first["family"], "setting": first["setting"],
               "tokens": first["tokens"], "seeds": len(ok)}
        for column, name in (("test_acc", "acc"), ("test_miou", "miou"), ("test_instance_miou", "instance_miou")):
            values = [r.get(column) for r in ok]
            if None in values:  # classification has no mIoU; part segmentation alone has the instance mIoU
                continue
            row.update({f"{name}_mean": statistics.fmean(values),
                        f"{name}_std": statistics.stdev(values) if len(values) > 1 else None,
                        f"{name}s": " ".join(f"{v:.4f}" for v in values)})
        table.append({**row, "params": first["params"], "gmacs": first["gmacs"],
                      "train_samples_per_s": statistics.fmean(r["train_samples_per_s"] for r in ok),
                      "train_s": statistics.fmean(r["train_s"] for r in ok),
                      "peak_mem_mib": max(r["peak_mem_mib"] for r in ok), "epochs": first["epochs"]})
    return table


def finish(rows: list[dict], out: Path) -> list[dict]:
    """summary.csv and the plots of a finished (or stopped) study."""
    from bixt.study.plots import plot_study

    table = summarize(rows)
    atomic_write(out / "summary.csv", rows_to_csv(table, SUMMARY_COLUMNS).encode())
    plot_study(table, out)
    return table


if __name__ == "__main__":  # the fresh process of `run_training`: one JSON line on stdout
    tune_allocator()  # as `bixt train` in its own process: BIXT_MALLOC is inherited
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
