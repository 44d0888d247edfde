"""`bixt train`: one config, a run folder, and a loop that can be killed at any point and resumed exactly.

Config precedence: TrainConfig's defaults < the run's saved config (--resume) < a TOML/YAML file (--config) < the
options given. The resolved config is saved as config.yaml in the run folder (timm's args.yaml).

Exact resume: the batches of an epoch are fixed by (seed, epoch), augmentation by (seed, epoch, sample), and the
checkpoint holds the optimizer, scheduler, every process's RNG state and the position inside the epoch, so a
resumed run computes what the uninterrupted one would have. Under torchrun the loop runs on every process
(DistributedDataParallel, gloo on CPU, NCCL on CUDA); only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from bixt.train import distributed as dist_
from bixt.train import rundir
from bixt.data import DEFAULT_MODELS, build_data, parse_spec
from bixt.train.distributed import Dist
from bixt.train.engine import build_optimizer, build_scheduler, epoch_batches, evaluate, loader, predict, steps_per_epoch


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; the defaults train `bixt_digits` on digits to 98-99.7 % in 1-2 minutes."""

    model: str | None = None  # None: the data's default model (bixt.data.DEFAULT_MODELS)
    model_args: dict = field(default_factory=dict)  # overrides of the model's config, e.g. {dim: 128, depth: 6}
    data: str = "digits"
    epochs: int = 40
    batch_size: int = 64  # global: split evenly over the processes
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 3.0  # capped at half the run, so short runs still anneal
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0  # max gradient norm; None: no clipping
    amp: bool = False  # bf16 autocast on CUDA (fp16 + loss scaling where bf16 is missing)
    augment: bool = True
    device: str | None = None  # cpu | cuda; None: cuda when available
    seed: int = 0
    workers: int | None = None  # DataLoader workers; None: what the data needs (0 for in-memory sets)
    out: str | None = None  # run folder; None: runs/<model>-<data>-<time>

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        checks = [(self.epochs >= 1, "--epochs must be >= 1"), (self.batch_size >= 1, "--batch-size must be >= 1"),
                  (self.lr > 0, "--lr must be > 0"), (self.min_lr >= 0, "min_lr must be >= 0"),
                  (self.weight_decay >= 0, "--weight-decay must be >= 0"),
                  (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
                  (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
                  (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 (or null for none)"),
                  (self.seed >= 0, "--seed must be >= 0"), (self.workers is None or self.workers >= 0,
                                                           "workers must be >= 0")]
        for ok, message in checks:
            if not ok:
                name = message.split()[0].lstrip("-").replace("-", "_")
                raise ValueError(f"{message}, got {getattr(self, name)}")
        parse_spec(self.data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(f: dataclasses.Field, value):
    """Config-file values arrive as YAML/TOML scalars: check (and widen int -> float) against the field type."""
    kinds = [t.strip() for t in str(f.type).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"{f.name} cannot be null")
    if f.name == "model_args":
        if not isinstance(value, dict):
            raise ValueError(f"model_args must be a mapping of model config fields, got {value!r}")
        return dict(value)
    for kind in kinds:
        t = _TYPES.get(kind)
        if t is bool and isinstance(value, bool) or t in (int, str) and type(value) is t:
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    raise ValueError(f"{f.name} must be {' or '.join(kinds)}, got {value!r}")


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Options that change no number a run computes: they may differ when resuming.
RESUME_FREE = ("device", "workers", "out")


def read_config_file(path: str | Path) -> dict:
    """A TOML (.toml) or YAML (.yaml/.yml) file of TrainConfig fields ('-' and '_' both accepted in keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist: check the path")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML ({e})") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
    else:
        raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of options, got a {type(raw).__name__}")
    options = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; valid are {', '.join(FIELDS)}")
    return options


def find_run(resume: str | Path) -> Path:
    """A run folder from --resume DIR or a file inside it (last.safetensors, last.state.pt, ...)."""
    path = Path(resume)
    run = path if path.is_dir() else path.parent
    if not path.exists():
        raise FileNotFoundError(f"--resume {path} does not exist: give a run folder (with {rundir.CONFIG})")
    if not (run / rundir.CONFIG).is_file():
        raise FileNotFoundError(f"{run} is not a bixt run folder: {rundir.CONFIG} is missing there")
    return run


def resolve_config(options: dict | None = None, config_file: str | Path | None = None,
                   resume: str | Path | None = None) -> TrainConfig:
    """The run's config: defaults < saved run config (resume) < config file < `options` (None values ignored).

    Resuming with an option that would change the computation is refused: the run would no longer be exact.
    """
    options = {k.replace("-", "_"): v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid are {', '.join(FIELDS)}")
    from_file = read_config_file(config_file) if config_file else {}
    given = {**from_file, **options}
    if "model_args" in from_file and "model_args" in options:  # the command line's model_args add to the file's
        given["model_args"] = {**from_file["model_args"], **options["model_args"]}
    if resume is None:
        return TrainConfig(**given)
    run = find_run(resume)
    if given.get("out") is not None and Path(given["out"]).resolve() != run.resolve():
        raise ValueError(f"--out {given['out']} and --resume {resume} name different runs: a resumed run stays in "
                         f"{run}")
    saved = read_config_file(run / rundir.CONFIG)
    changed = sorted(k for k, v in given.items() if k not in RESUME_FREE and saved.get(k) != v
                     and not (k == "model_args" and {**saved.get(k, {}), **v} == saved.get(k, {})))
    if changed:
        raise ValueError(f"--resume continues {run} as it was configured; {', '.join(changed)} differ(s) from its "
                         f"{rundir.CONFIG}: start a new run (--out) to change them")
    return TrainConfig(**{**saved, **{k: v for k, v in given.items() if k in RESUME_FREE}, "out": str(run)})


def resolve_model(cfg: TrainConfig) -> tuple[str, dict]:
    """The model name and its overrides: the data's default model when none is named."""
    if cfg.model is not None:
        return cfg.model, dict(cfg.model_args)
    name, args = DEFAULT_MODELS[parse_spec(cfg.data).kind]
    return name, {**args, **cfg.model_args}


def build_for_data(name: str, model_args: dict, data_spec: str, *, seed: int = 0, augment: bool = True,
                   need_train: bool = True, fit_data: bool = True):
    """(model config, data, overrides): the data sized for the model's input, the model's classes and input
    channels set from the data when `fit_data` (a fresh model), else checked against it (trained weights)."""
    from bixt.models.registry import model_config

    mcfg = model_config(name, **model_args)
    modality = getattr(mcfg, "modality", "image")
    spec = parse_spec(data_spec)
    data = build_data(spec, img_size=getattr(mcfg, "img_size", None) if modality == "image" else None,
                      points=getattr(mcfg, "seq_len", None) if modality == "points" else None,
                      seq_len=getattr(mcfg, "seq_len", None) if modality == "sequence" else None,
                      seed=seed, augment=augment, need_train=need_train)
    if data.modality != modality:
        raise ValueError(f"{name} takes {modality} inputs but --data {spec} gives {data.modality}: choose a model "
                         f"for {data.modality} data (bixt models) or other data")
    fields = {f.name for f in dataclasses.fields(mcfg)}
    wanted = {k: v for k, v in data.input_overrides.items() if k in fields}
    if fit_data:
        model_args = {**model_args, **wanted}
    else:
        classes, chans = getattr(mcfg, "num_classes", 0), getattr(mcfg, "in_chans", data.in_chans)
        if classes < data.num_classes:
            raise ValueError(f"{name} predicts {classes} classes but {spec} has {data.num_classes}: "
                             "evaluate on data with at most that many classes")
        if chans != data.in_chans:
            raise ValueError(f"{name} takes {chans} input channels but {spec} gives {data.in_chans}")
        if getattr(mcfg, "vocab_size", 0) < data.vocab_size:
            raise ValueError(f"{name} embeds {getattr(mcfg, 'vocab_size', 0)} ids but {spec} uses "
                             f"{data.vocab_size}: evaluate a model trained on such data")
    return model_config(name, **model_args), data, model_args


@dataclass
class TrainResult:
    run: Path
    status: str  # finished | interrupted
    epochs_done: int
    best_acc: float
    best_epoch: int
    last: dict  # the last metrics row ({} when no epoch finished)
    params: int
    seconds: float  # training time, all sessions of the run together
    samples_per_s: float
    signal: int = 0  # the signal that interrupted the run
    main: bool = True  # False on the other processes of a torchrun job


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped before that step changed any weight."""


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save, and stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _prepare_run(cfg: TrainConfig, name: str, resuming: bool) -> Path:
    """Rank 0: the run folder, created; refuses to reuse a non-empty one unless resuming."""
    if cfg.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run = Path("runs") / f"{name}-{parse_spec(cfg.data).kind}-{stamp}"
        for i in range(1, 1000):
            if not run.exists():
                break
            run = run.with_name(f"{name}-{parse_spec(cfg.data).kind}-{stamp}-{i}")
    else:
        run = Path(cfg.out)
    if not resuming and run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise FileExistsError(f"--out {run} already exists and is not empty: pass --resume {run} to continue it, "
                              "or choose a new --out")
    run.mkdir(parents=True, exist_ok=True)
    return run


def _agree(d: Dist, fn: Callable):
    """Run `fn` on rank 0 and hand its result (or raise its user error) on every rank."""
    result, error = None, None
    if d.main:
        try:
            result = fn()
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            error = e
    result, error = dist_.broadcast(d, (result, error))
    if error is not None:
        raise error
    return result


def _rng_state(d: Dist) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda"
            else None}


def _progress(console):
    from rich import progress as p


    return p.Progress(p.TextColumn("{task.description}"), p.BarColumn(), p.MofNCompleteColumn(),
                      p.TimeElapsedColumn(), p.TextColumn("eta"), p.TimeRemainingColumn(),
                      p.TextColumn("{task.fields[info]}"), console=console)


def train(options: dict | TrainConfig | None = None, *, config_file: str | Path | None = None,
          resume: str | Path | None = None, console=None,
          on_step: Callable[[int, int, nn.Module], None] | None = None) -> TrainResult:
    """Train a registered model on a data spec; see the module docstring. `console` (rich) shows progress;
    `on_step(epoch, step, model)` is called after every optimizer step (a hook for tests and tools)."""
    if isinstance(options, TrainConfig):
        options = options.to_dict()
    cfg = resolve_config(options, config_file, resume)
    d = dist_.setup(cfg.device)
    try:
        return _train(cfg, d, resume is not None, console if d.main else None, on_step)
    finally:
        dist_.teardown(d)


def _train(cfg: TrainConfig, d: Dist, resuming: bool, console, on_step) -> TrainResult:
    if cfg.amp and d.device.type != "cuda":
        raise ValueError("--amp runs on CUDA only (bf16/fp16 autocast): drop --amp on the CPU")
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {d.world} processes: use a multiple "
                         f"of {d.world}")
    name, model_args = resolve_model(cfg)
    mcfg, data, model_args = build_for_data(name, model_args, cfg.data, seed=cfg.seed, augment=cfg.augment)
    steps = steps_per_epoch(len(data.train), cfg.batch_size, d)
    if steps == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(data.train)} training samples: "
                         "use a smaller batch")
    cfg = dataclasses.replace(cfg, model=name, model_args=model_args)
    run = _agree(d, lambda: _prepare_run(cfg, name, resuming))
    cfg = dataclasses.replace(cfg, out=str(run))

    from bixt.models.registry import get_entry

    torch.manual_seed(cfg.seed)  # the same initial weights on every process and for any world size
    model = get_entry(name).build(mcfg)
    params = sum(p.numel() for p in model.parameters())
    state = None
    if resuming and (run / rundir.STATE).exists():  # a run stopped before its first save starts over
        weights, state = rundir.load_checkpoint_state(run)
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            detail = (str(e).splitlines()[1:] or [str(e)])[0].strip()
            raise ValueError(f"{run / rundir.LAST} does not fit {name}: {detail}") from None
    model.to(d.device)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = build_scheduler(opt, cfg.epochs * steps, min(round(cfg.warmup_epochs * steps), cfg.epochs * steps // 2),
                            cfg.min_lr)
    amp_dtype = None
    if cfg.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.active else model

    epoch, step, global_step, sums, history = 0, 0, 0, [0.0, 0.0, 0.0], []
    best_acc, best_epoch, epoch_seconds, train_seconds = -1.0, 0, 0.0, 0.0
    torch.manual_seed(cfg.seed + d.rank)  # dropout / drop-path differ between processes
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step, global_step = state["epoch"], state["step"], state["global_step"]
        sums, history = list(state["sums"]), list(state["history"])
        best_acc, best_epoch = state["best_acc"], state["best_epoch"]
        epoch_seconds, train_seconds = state["epoch_seconds"], state["train_seconds"]
        if len(state["rng"]) == d.world:  # else (another world size) the fresh per-rank seed above stands
            torch.set_rng_state(state["rng"][d.rank]["cpu"])
            if d.device.type == "cuda" and state["rng"][d.rank]["cuda"] is not None:
                torch.cuda.set_rng_state(state["rng"][d.rank]["cuda"], d.device)
    if d.main:
        rundir.atomic_write(run / rundir.CONFIG, _yaml(cfg.to_dict()).encode())
        rundir.write_metrics(run, history)  # drops rows written after the checkpoint being resumed

    def save(epoch_: int, step_: int) -> None:
        rng = dist_.gather(d, _rng_state(d))
        if d.main:
            rundir.save_checkpoint(run, model.state_dict(), {
                "epoch": epoch_, "step": step_, "global_step": global_step, "sums": sums, "history": history,
                "best_acc": best_acc, "best_epoch": best_epoch, "epoch_seconds": epoch_seconds,
                "train_seconds": train_seconds, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rng, "world": d.world,
                "config": cfg.to_dict()})

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    autocast = (lambda: torch.autocast(d.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    workers = data.workers if cfg.workers is None else cfg.workers
    title = f"{name} on {cfg.data}"
    last_plot, loop_seconds, samples_seen = time.monotonic(), 0.0, 0
    status, signum = "finished", 0
    progress = _progress(console) if console is not None else contextlib.nullcontext()
    with _StopFlag() as stop, progress:
        if console is not None:
            ep_task = progress.add_task("epochs", total=cfg.epochs, completed=epoch, info=title)
            step_task = progress.add_task(f"epoch {epoch + 1}", total=steps, completed=step, info="")
        while epoch < cfg.epochs:
            data.train.epoch = epoch
            net.train()
            t0 = time.perf_counter() - epoch_seconds  # the epoch's clock goes on across a resume
            t_loop = time.perf_counter()
            batches = epoch_batches(len(data.train), cfg.batch_size, epoch, cfg.seed, d)[step:]
            for x, y in loader(data.train, batches, workers, d.device):
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                with autocast():
                    logits = predict(net, x, data.pad_id)
                    loss = criterion(logits.float(), y)
                value = loss.item()
                total = dist_.all_sum(d, [value * len(y), (logits.argmax(1) == y).sum().item(), len(y),
                                          float(not math.isfinite(value)), float(stop.signum > 0)])
                if total[3]:
                    where = value if not math.isfinite(value) else "non-finite on another process"
                    last = run / rundir.LAST
                    raise TrainingDiverged(
                        f"loss is {where} at step {global_step + 1} (epoch {epoch + 1}, batch {step + 1}); no weight "
                        f"was updated; the last good checkpoint is {last if last.exists() else 'none yet'}: lower "
                        "--lr or check the data")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad is not None:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(opt)
                scaler.update()
                sched.step()
                sums = [s + v for s, v in zip(sums, total[:3], strict=True)]
                step, global_step, samples_seen = step + 1, global_step + 1, samples_seen + int(total[2])
                epoch_seconds = time.perf_counter() - t0
                if console is not None:
                    progress.update(step_task, completed=step, info=f"loss {sums[0] / sums[2]:.4f}  "
                                    f"acc {100 * sums[1] / sums[2]:.2f}%  {sums[2] / epoch_seconds:,.0f} samples/s")
                if on_step is not None:
                    on_step(epoch, step, model)
                if total[4]:
                    status, signum = "interrupted", stop.signum or signal.SIGINT
                    break
            loop_seconds += time.perf_counter() - t_loop
            if status == "interrupted":
                save(epoch, step)
                break
            test = evaluate(model, data.test, max(1, 2 * cfg.batch_size // d.world), d, amp_dtype=amp_dtype,
                            workers=workers, pad_id=data.pad_id)
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            row = {"epoch": epoch + 1, "train_loss": sums[0] / sums[2], "train_acc": sums[1] / sums[2],
                   "test_loss": test["loss"], "test_acc": test["top1"], "test_top5": test["top5"],
                   "lr": sched.get_last_lr()[0], "seconds": epoch_seconds}
            history.append(row)
            if row["test_acc"] > best_acc:
                best_acc, best_epoch = row["test_acc"], epoch + 1
                if d.main:
                    rundir.save_best(run, model.state_dict())
            epoch, step, sums, epoch_seconds = epoch + 1, 0, [0.0, 0.0, 0.0], 0.0
            save(epoch, 0)
            if d.main:
                rundir.write_metrics(run, history)
                if epoch == cfg.epochs or time.monotonic() - last_plot > 30:
                    rundir.plot_curves(run, history, title)
                    last_plot = time.monotonic()
            if console is not None:
                progress.update(ep_task, completed=epoch, info=f"test acc {100 * row['test_acc']:.2f}%  "
                                f"best {100 * best_acc:.2f}% (epoch {best_epoch})")
                if epoch < cfg.epochs:
                    progress.reset(step_task, total=steps, description=f"epoch {epoch + 1}", info="")
    result = TrainResult(run, status, len(history), max(best_acc, 0.0), best_epoch, history[-1] if history else {},
                         params, train_seconds + epoch_seconds, samples_seen / max(loop_seconds, 1e-9), signum,
                         d.main)
    if d.main:
        if history and status == "interrupted":
            rundir.plot_curves(run, history, title)
        if status == "finished":
            summary = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("run", "main")}
            summary.update(model=name, data=cfg.data, run=str(run))
            rundir.atomic_write(run / rundir.SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())
    return result


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "read_config_file", "resolve_config", "train"]
