"""Where a run is: the position, running sums, history and clocks saved with every checkpoint (TrainState), one
step's numbers summed over the processes (StepStats), and each process's random state."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from bixt.train.distributed import Dist


class StepStats(NamedTuple):
    """One optimizer step's numbers, summed over every process in a single all-reduce."""

    loss_sum: float  # loss x what it is the mean over (samples; dense tasks: labelled tokens)
    correct: float
    samples: float  # what accuracy counts: samples, or labelled tokens (points, pixels)
    inputs: float  # samples, for the throughput
    diverged: float  # processes whose loss was not finite
    stopping: float  # processes asked to stop (Ctrl-C, SIGTERM)


@dataclass
class TrainState:
    """Everything about a run's progress that a resume must restore, beside the weights, optimizer and RNG."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    loss_sum: float = 0.0  # the current epoch's training numbers so far (StepStats summed)
    correct: float = 0.0
    samples: float = 0.0
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    best_acc: float = -1.0  # the best test top-1 (dense tasks: mIoU)
    best_epoch: int = 0
    epoch_seconds: float = 0.0  # the current epoch so far, evaluation included
    train_seconds: float = 0.0  # the finished epochs, every session of the run together

    def __post_init__(self):
        self._clock = time.perf_counter()  # not saved: a resumed epoch's clock restarts from epoch_seconds

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.samples

    @property
    def train_acc(self) -> float:
        return self.correct / self.samples

    def start_clock(self) -> None:
        self._clock = time.perf_counter() - self.epoch_seconds

    def record_step(self, stats: StepStats) -> None:
        self.loss_sum += stats.loss_sum
        self.correct += stats.correct
        self.samples += stats.samples
        self.step += 1
        self.global_step += 1
        self.epoch_seconds = time.perf_counter() - self._clock

    def end_epoch(self, test: dict, lr: float) -> tuple[dict, bool]:
        """Close the epoch with its test metrics: (its metrics row, whether it is the best so far)."""
        self.epoch_seconds = time.perf_counter() - self._clock
        self.train_seconds += self.epoch_seconds
        row = {"epoch": self.epoch + 1, "train_loss": self.train_loss, "train_acc": self.train_acc,
               "test_loss": test["loss"], "test_acc": test["top1"], "test_top5": test["top5"], "lr": lr,
               "seconds": self.epoch_seconds, "test_miou": test.get("miou"),
               "test_instance_miou": test.get("instance_miou")}
        self.history.append(row)
        score = test.get("miou", row["test_acc"])  # dense tasks keep the best class-mean IoU
        improved = score > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = score, self.epoch + 1
        self.epoch, self.step, self.epoch_seconds = self.epoch + 1, 0, 0.0
        self.loss_sum = self.correct = self.samples = 0.0
        return row, improved

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        if "sums" in state:  # checkpoints written before the sums had names
            state = {**state, **dict(zip(("loss_sum", "correct", "samples"), state["sums"], strict=True))}
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])
        self.history = list(self.history)


def rng_state(d: Dist) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None}


def restore_rng(states: list[dict], d: Dist) -> None:
    """This process's saved RNG state. A run resumed with another number of processes keeps the fresh per-rank
    seed instead: its streams cannot match the saved ones anyway."""
    if len(states) != d.world:
        return
    torch.set_rng_state(states[d.rank]["cpu"])
    if d.device.type == "cuda" and states[d.rank]["cuda"] is not None:
        torch.cuda.set_rng_state(states[d.rank]["cuda"], d.device)
