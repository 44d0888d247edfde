"""A training run's folder: resolved config, metrics.csv, curves.png and checkpoints, every write atomic.

  config.yaml          the resolved training config (`bixt train --config` reads it back)
  metrics.csv          one row per finished epoch
  curves.png           loss and accuracy per epoch
  last.safetensors     weights at the last save (end of an epoch, or where Ctrl-C stopped the run)
  last.state.pt        optimizer, scheduler, RNG and position state of that save (torch.load(weights_only=True))
  best.safetensors     weights of the epoch with the best test accuracy
  summary.json         the final numbers, once the run has finished
  .lock                held (flock) by the process writing the folder, holding its pid; removed when it ends

The weights and their state are two files; the state records a CRC of the weights it belongs with, so a crash
between the two renames is detected on resume instead of silently mixing two steps.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import pickle
import zlib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import torch
from torch import Tensor

from bixt.io.atomic import atomic_path, atomic_write
from bixt.io.checkpoint import torch_load

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there go unlocked, and two runs on one folder go undetected
    fcntl = None

CONFIG, METRICS, CURVES, SUMMARY = "config.yaml", "metrics.csv", "curves.png", "summary.json"
CLASSES = "classes.json"  # the class names in label order: `bixt eval` checks data it is given against them


def write_classes(run: Path, classes: list[str]) -> None:
    import json

    atomic_write(Path(run) / CLASSES, json.dumps([str(c) for c in classes]).encode())


def read_classes(run: Path) -> list[str] | None:
    """The run's class names, or None for a run made before they were saved."""
    import json

    path = Path(run) / CLASSES
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is corrupt (not a JSON list of class names): delete it to skip the check") from None
    if not isinstance(names, list):
        raise ValueError(f"{path} is corrupt (not a JSON list of class names): delete it to skip the check")
    return [str(n) for n in names]
LAST, STATE, BEST = "last.safetensors", "last.state.pt", "best.safetensors"
LOCK = ".lock"
COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "lr", "seconds", "test_miou",
           "test_instance_miou")  # dense tasks: train/test acc per labelled token, no top-5; mIoU (part seg: both)


def prepare(out: str | None, name: str, resuming: bool, lock: RunLock | None = None) -> Path:
    """The run folder, created: `out`, or runs/<name>-<time>; a non-empty one is reused only when resuming. With
    `lock`, the folder is locked for this process (refused when another run holds it)."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run = Path("runs") / f"{name}-{stamp}"
        for i in range(1, 1000):  # several runs started in the same second
            if not run.exists():
                break
            run = run.with_name(f"{name}-{stamp}-{i}")
    else:
        run = Path(out)
    if (pid := lock_holder(run)) is not None:
        raise ValueError(_busy(run, pid))
    if not resuming:
        _check_unused(run)  # before anything is created in a folder that is not ours
    run.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire(run)
        if not resuming:
            try:  # again, now that it is ours: a run may have written it since the first look
                _check_unused(run)
            except FileExistsError:
                lock.release()
                raise
    return run


def _check_unused(run: Path) -> None:
    if run.exists() and (not run.is_dir() or any(p.name != LOCK for p in run.iterdir())):
        resume = f"continue it with --resume {run}, " if (run / STATE).is_file() else ""
        raise FileExistsError(f"--out {run} already exists and is not empty: {resume}choose a new --out, or delete "
                              f"{run} first")


def _busy(run: Path, pid: str) -> str:
    return (f"{run} is in use by another bixt train (pid {pid or 'unknown'}): wait for it to end (or stop it), or "
            "choose another --out")


class RunLock:
    """An exclusive flock on <run>/.lock for a run's whole life, so two processes never write one folder. The OS
    releases it when the process dies however it dies, so a crash leaves no stale lock (at most the file, which
    the next run takes over)."""

    def __init__(self):
        self._file = None
        self._path: Path | None = None

    def acquire(self, run: Path) -> None:
        """Lock `run` (created if needed), or raise ValueError naming the pid that holds it."""
        if fcntl is None:
            return
        run.mkdir(parents=True, exist_ok=True)
        path = run / LOCK
        while True:
            f = open(path, "a+")  # no truncation: the holder's pid stays readable
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip()
                f.close()
                raise ValueError(_busy(run, pid)) from None
            if _same_file(f, path):
                break
            f.close()  # the holder removed this file as it let go: lock the one that is there now
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file, self._path = f, path

    def release(self) -> None:
        """Remove the lock file, then unlock: whoever opened the removed file meanwhile sees it gone and retries."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._path.unlink()
        self._file.close()
        self._file = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(run: str | Path) -> RunLock:
    """`run` locked by this process until the returned lock is released (or the process ends)."""
    held = RunLock()
    held.acquire(Path(run))
    return held


def lock_holder(run: Path) -> str | None:
    """The pid holding `run`'s lock ('' when it has not written it yet), None when no process holds it."""
    if fcntl is None:
        return None
    try:
        f = open(run / LOCK)
    except OSError:  # no lock file, or `run` is no folder
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe: closing the file lets it go at once
        except BlockingIOError:
            return f.read().strip()
    return None


def _same_file(f, path: Path) -> bool:
    try:
        here, there = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def write_config(run: Path, config: dict) -> None:
    import yaml

    atomic_write(run / CONFIG, yaml.safe_dump(config, sort_keys=False).encode())


def weights_crc(state: Mapping[str, Tensor]) -> int:
    """CRC-32 of every tensor's bytes in key order: ties a state file to the weights file saved with it."""
    crc = 0
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"", crc)
    return crc


def save_best(run: Path, weights: Mapping[str, Tensor]) -> None:
    from bixt.io.checkpoint import save_weights

    save_weights(weights, run / BEST)


def save_checkpoint(run: Path, weights: Mapping[str, Tensor], state: dict) -> None:
    """last.safetensors + last.state.pt. The state is fully written before the weights are replaced and
    renamed right after them, so the pair on disk is always either the old or the new one (CRC-checked)."""
    from bixt.io.checkpoint import save_weights

    weights = {k: v.detach().cpu() for k, v in weights.items()}
    buf = io.BytesIO()
    torch.save({**state, "weights_crc": weights_crc(weights)}, buf)
    with atomic_path(run / STATE) as tmp:
        tmp.write_bytes(buf.getvalue())
        save_weights(weights, run / LAST)


def load_checkpoint_state(run: Path) -> tuple[dict[str, Tensor], dict]:
    """The weights and the state of `run`'s last checkpoint, checked to belong together. Never unpickles code."""
    from bixt.io.checkpoint import read_state_dict, refusal

    path = run / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --resume needs a run folder with {LAST} and {STATE}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is a corrupt or empty checkpoint (0 bytes): {_LOST}")
    try:
        state = torch_load(path)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} was refused, not unpickled ({refusal(e)}): it is not a bixt training state") \
            from None
    # torch.load fails on a truncated or foreign file with whatever its reader hits first (EOFError() has no text).
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is a corrupt or empty checkpoint ({detail}): {_LOST}") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a bixt training state (no {' / '.join(missing)} entries): {_LOST}")
    weights = read_state_dict(run / LAST)
    if weights_crc(weights) != state["weights_crc"]:
        raise ValueError(f"{run / LAST} does not belong with {path} (the run was stopped between the two renames, "
                         "or a file was replaced): restart the run, or train from best.safetensors")
    return weights, state


_STATE_KEYS = ("epoch", "weights_crc", "optimizer", "scheduler", "rng")  # what a resume reads besides TrainState's
_LOST = (f"put back the run's own {STATE}, or start a new run with --out ({BEST} keeps the best weights so far)")


def write_metrics(run: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else "" if v is None else v)
                         for k, v in row.items() if k in COLUMNS})
    atomic_write(run / METRICS, buf.getvalue().encode())


def read_metrics(run: Path) -> list[dict]:
    with open(run / METRICS, newline="") as f:
        return [{k: (int(v) if k == "epoch" else None if v == "" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def plot_curves(run: Path, rows: list[dict], title: str = "") -> None:
    """curves.png: loss (left) and accuracy (right) per epoch, train and test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    dense = any(r.get("test_miou") is not None for r in rows)
    for ax, key, label in ((ax_loss, "loss", "loss"),
                           (ax_acc, "acc", "per-token accuracy, mIoU" if dense else "top-1 accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", ms=3, label="train")
        ax.plot(epochs, [r[f"test_{key}"] for r in rows], "o-", ms=3, label="test")
        if key == "acc" and dense:
            ax.plot(epochs, [r["test_miou"] for r in rows], "o-", ms=3, label="test mIoU")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(run / CURVES, buf.getvalue())
