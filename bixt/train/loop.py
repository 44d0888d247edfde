"""`bixt train`: one config, a run folder, and a loop that can be killed at any point and resumed exactly.

Exact resume: the batches of an epoch are fixed by (seed, epoch), augmentation by (seed, epoch, sample), and the
checkpoint holds the optimizer, scheduler, every process's RNG state and the position inside the epoch, so a
resumed run computes what the uninterrupted one would have. Under torchrun the loop runs on every process
(DistributedDataParallel, gloo on CPU, NCCL on CUDA); only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bixt.data import Data, parse_spec, take
from bixt.nn.allocator import tune_allocator
from bixt.nn.compile import check_compile
from bixt.train import distributed as dist_
from bixt.train import rundir
from bixt.train.build import build_for_data, build_model, resolve_model
from bixt.train.checkpointer import Checkpointer
from bixt.train.config import TrainConfig, resolve_config
from bixt.train.distributed import Dist
from bixt.train.engine import (
    OnStep,
    Throughput,
    amp_dtype_for,
    build_learner,
    steps_per_epoch,
    train_one_epoch,
    validate,
)
from bixt.train.state import TrainState, restore_rng
from bixt.train.terminal import StopFlag, reporter


@dataclass
class TrainResult:
    """What `train` returns, on every process."""

    run: Path
    status: str  # finished | interrupted
    epochs_done: int
    best_acc: float
    best_epoch: int
    last: dict  # the last metrics row ({} when no epoch finished)
    params: int
    seconds: float  # training time, all sessions of the run together
    samples_per_s: float  # this session's; under --compile its first (compiling) step is left out
    signal: int = 0  # the signal that interrupted the run
    main: bool = True  # False on the other processes of a torchrun job
    compile_s: float | None = None  # --compile: this session's first step, which compiled (in its epoch's seconds)


def train(options: dict | TrainConfig | None = None, *, config_file: str | Path | None = None,
          resume: str | Path | None = None, console=None, on_step: OnStep | None = None) -> TrainResult:
    """Train a registered model on a data spec; see the module docstring. `console` (rich) shows progress;
    `on_step(epoch, step, model)` is called after every optimizer step (a hook for tests and tools)."""
    if isinstance(options, TrainConfig):
        options = options.to_dict()
    cfg = resolve_config(options, config_file, resume)
    d = dist_.setup(cfg.device, cfg.shard_tokens)
    try:
        return _train(cfg, d, resume is not None, console if d.main else None, on_step)
    finally:
        dist_.teardown(d)


def _train(cfg: TrainConfig, d: Dist, resuming: bool, console, on_step: OnStep | None) -> TrainResult:
    cfg, mcfg, data, steps = _fit(cfg, d)
    torch.manual_seed(cfg.seed)  # every process and every world size starts from the same weights
    model = build_model(cfg.model, mcfg, cfg.model_args)  # before the folder: a bad model_args leaves nothing
    if cfg.grad_checkpointing:
        _checkpoint_activations(model, cfg.model)
    if d.shard > 1:
        model.shard_tokens(d.token_shard())
    lock = rundir.RunLock()  # taken by rank 0 alone, the one that writes
    run = dist_.on_main(d, lambda: rundir.prepare(cfg.out, f"{cfg.model}-{parse_spec(cfg.data).kind}", resuming,
                                                  lock))
    with lock:  # held until the run ends, however it ends; the OS lets go of it if the process dies
        return _run(dataclasses.replace(cfg, out=str(run)), d, model, data, steps, resuming, console, on_step)


def _run(cfg: TrainConfig, d: Dist, model: nn.Module, data: Data, steps: int, resuming: bool, console,
         on_step: OnStep | None) -> TrainResult:
    saved = _load_checkpoint(cfg, model) if resuming else None
    learner = build_learner(cfg, model, steps, d, data.ignore_index)
    state = TrainState()
    # Drop-path differs between the data-parallel processes; those sharing a sample's tokens draw the same masks.
    torch.manual_seed(cfg.seed + d.data_rank)
    if saved is not None:
        learner.load_state_dict(saved)
        state.load_state_dict(saved)
        restore_rng(saved["rng"], d)
    saver = Checkpointer(cfg, learner, state)
    saver.begin()
    dist_.on_main(d, lambda: rundir.write_classes(Path(cfg.out), data.classes))
    speed, stopped = Throughput(), False
    with StopFlag() as stop, reporter(console, cfg, steps, state, data.task == "segment") as report:
        while state.epoch < cfg.epochs:
            if not train_one_epoch(cfg, learner, data, state, stop=stop, report=report, speed=speed,
                                   on_step=on_step):
                stopped = True
                saver.save()
                break
            row, improved = state.end_epoch(validate(cfg, learner, data, state), learner.lr)
            saver.end_epoch(improved)
            report.epoch(state, row)
    signum = (stop.signum or signal.SIGINT) if stopped else 0  # the signal may have reached another process only
    result = _result(Path(cfg.out), signum, state, model, speed, d)
    saver.finish(result)
    return result


def _result(run: Path, signum: int, state: TrainState, model: nn.Module, speed: Throughput, d: Dist) -> TrainResult:
    return TrainResult(run, "interrupted" if signum else "finished", len(state.history), max(state.best_acc, 0.0),
                       state.best_epoch, state.history[-1] if state.history else {},
                       sum(p.numel() for p in model.parameters()), state.train_seconds + state.epoch_seconds,
                       speed.per_second, signum, d.main, speed.compile_s)


def _fit(cfg: TrainConfig, d: Dist) -> tuple[TrainConfig, object, Data, int]:
    """The checks that need the processes or the data; the config with its model named and sized for the data;
    the model config, the data, and the optimizer steps per epoch."""
    amp_dtype_for(cfg.amp, d.device)  # a CPU without bf16 refuses --amp here, before the run folder is made
    if cfg.compile:
        check_compile(d.device)  # likewise no C++ compiler (CPU) or triton (CUDA)
    if cfg.batch_size % d.data_world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {d.data_world} data-parallel processes: "
                         f"use a multiple of {d.data_world}")
    name, model_args = resolve_model(cfg)
    mcfg, data, model_args = build_for_data(name, model_args, cfg.data, seed=cfg.seed, augment=cfg.augment)
    data = dataclasses.replace(data, train=take(data.train, cfg.train_samples, "train"),
                               test=take(data.test, cfg.test_samples, "test"))
    if data.task == "segment" and d.shard > 1:
        raise ValueError(f"--data {cfg.data} is a dense task, which does not run token-sharded: drop --shard-tokens")
    steps = steps_per_epoch(len(data.train), cfg.batch_size, d)
    if steps == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(data.train)} training samples: "
                         "use a smaller batch")
    if cfg.workers is not None:
        data = dataclasses.replace(data, workers=cfg.workers)
    return dataclasses.replace(cfg, model=name, model_args=model_args), mcfg, data, steps


def _checkpoint_activations(model: nn.Module, name: str) -> None:
    """--grad-checkpointing: the model recomputes its blocks' activations in the backward (timm's API)."""
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        raise ValueError(f"{name} has no gradient checkpointing (set_grad_checkpointing): drop --grad-checkpointing")
    model.set_grad_checkpointing(True)
    tune_allocator(lean=True)  # the resident set follows what is live, or it keeps most of what checkpointing saves


def _load_checkpoint(cfg: TrainConfig, model: nn.Module) -> dict:
    """The run's last checkpoint: its weights loaded into `model`, its state returned."""
    run = Path(cfg.out)
    weights, saved = rundir.load_checkpoint_state(run)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        detail = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise ValueError(f"{run / rundir.LAST} does not fit {cfg.model} ({detail}): put back the run's own files or "
                         "start a new run (--out)") from None
    return saved


__all__ = ["TrainResult", "train"]
