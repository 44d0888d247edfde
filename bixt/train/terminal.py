"""The person at the terminal: a progress display (rank 0 with a console; nothing elsewhere), and Ctrl-C or
SIGTERM as a request to stop that the loop honours at the next step boundary."""
from __future__ import annotations

import signal
import threading

from bixt.train.config import TrainConfig
from bixt.train.state import TrainState


class Reporter:
    """Shows nothing: other processes of a torchrun job, and runs without a console (tests, tools)."""

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def step(self, state: TrainState) -> None:
        pass

    def epoch(self, state: TrainState, row: dict) -> None:
        pass


class ProgressReporter(Reporter):
    """Two rich progress bars: epochs (test accuracy, best so far) and the steps of the current epoch."""

    def __init__(self, console, title: str, epochs: int, steps: int, state: TrainState, dense: bool = False):
        from rich import progress as p

        self.epochs, self.steps, self.dense = epochs, steps, dense
        self.progress = p.Progress(p.TextColumn("{task.description}"), p.BarColumn(), p.MofNCompleteColumn(),
                                   p.TimeElapsedColumn(), p.TextColumn("eta"), p.TimeRemainingColumn(),
                                   p.TextColumn("{task.fields[info]}"), console=console)
        self.epoch_bar = self.progress.add_task("epochs", total=epochs, completed=state.epoch, info=title)
        self.step_bar = self.progress.add_task(f"epoch {state.epoch + 1}", total=steps, completed=state.step, info="")

    def __enter__(self) -> ProgressReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def step(self, state: TrainState) -> None:
        unit = "labelled tokens/s" if self.dense else "samples/s"  # dense: what the accuracy counts
        self.progress.update(self.step_bar, completed=state.step, info=f"loss {state.train_loss:.4f}  acc "
                             f"{100 * state.train_acc:.2f}%  {state.samples / state.epoch_seconds:,.0f} {unit}")

    def epoch(self, state: TrainState, row: dict) -> None:
        test = f"test mIoU {100 * row['test_miou']:.2f}%" if self.dense else f"test acc {100 * row['test_acc']:.2f}%"
        self.progress.update(self.epoch_bar, completed=state.epoch, info=f"{test}  best {100 * state.best_acc:.2f}% "
                             f"(epoch {state.best_epoch})")
        if state.epoch < self.epochs:
            self.progress.reset(self.step_bar, total=self.steps, description=f"epoch {state.epoch + 1}", info="")


def reporter(console, cfg: TrainConfig, steps: int, state: TrainState, dense: bool = False) -> Reporter:
    if console is None:
        return Reporter()
    return ProgressReporter(console, cfg.title, cfg.epochs, steps, state, dense)


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save, and stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
