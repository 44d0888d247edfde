"""What a run writes to its folder, and when (the formats are rundir's). Rank 0 alone writes; every rank takes
part in gathering the RNG states, a collective."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bixt.train import rundir
from bixt.train.config import TrainConfig
from bixt.train.distributed import gather
from bixt.train.engine import Learner
from bixt.train.state import TrainState, rng_state

if TYPE_CHECKING:
    from bixt.train.loop import TrainResult


class Checkpointer:
    def __init__(self, cfg: TrainConfig, learner: Learner, state: TrainState):
        self.cfg, self.learner, self.state, self.d = cfg, learner, state, learner.d
        self.run = Path(cfg.out)
        self._plotted = time.monotonic()

    def begin(self) -> None:
        """config.yaml, and metrics.csv cut back to the checkpoint being resumed (later rows are recomputed)."""
        if self.d.main:
            rundir.write_config(self.run, self.cfg.to_dict())
            rundir.write_metrics(self.run, self.state.history)

    def save(self) -> None:
        """last.safetensors + last.state.pt: what a resume needs to go on exactly from here."""
        rng = gather(self.d, rng_state(self.d))
        if self.d.main:
            rundir.save_checkpoint(self.run, self.learner.model.state_dict(), {
                **self.state.state_dict(), **self.learner.state_dict(), "rng": rng, "world": self.d.world,
                "config": self.cfg.to_dict()})

    def end_epoch(self, improved: bool) -> None:
        """The best weights when the epoch improved on them, the checkpoint, metrics.csv, and curves.png at the end
        or at most every 30 s: plotting takes longer than a small model's epoch."""
        if improved and self.d.main:
            rundir.save_best(self.run, self.learner.model.state_dict())
        self.save()
        if self.d.main:
            rundir.write_metrics(self.run, self.state.history)
            if self.state.epoch == self.cfg.epochs or time.monotonic() - self._plotted > 30:
                rundir.plot_curves(self.run, self.state.history, self.cfg.title)
                self._plotted = time.monotonic()

    def finish(self, result: TrainResult) -> None:
        """curves.png up to where an interrupted run stopped; summary.json once it has finished."""
        if not self.d.main:
            return
        if self.state.history and result.status == "interrupted":
            rundir.plot_curves(self.run, self.state.history, self.cfg.title)
        if result.status == "finished":
            summary = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("run", "main")}
            summary.update(model=self.cfg.model, data=self.cfg.data, run=str(self.run))
            rundir.atomic_write(self.run / rundir.SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())
