"""A training run's folder: resolved config, metrics.csv, curves.png and checkpoints, every write atomic.

  config.yaml          the resolved training config (`bixt train --config` reads it back)
  metrics.csv          one row per finished epoch
  curves.png           loss and accuracy per epoch
  last.safetensors     weights at the last save (end of an epoch, or where Ctrl-C stopped the run)
  last.state.pt        optimizer, scheduler, RNG and position state of that save (torch.load(weights_only=True))
  best.safetensors     weights of the epoch with the best test accuracy
  summary.json         the final numbers, once the run has finished

The weights and their state are two files; the state records a CRC of the weights it belongs with, so a crash
between the two renames is detected on resume instead of silently mixing two steps.
"""
from __future__ import annotations

import csv
import io
import pickle
import zlib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import torch
from torch import Tensor

from bixt.io.atomic import atomic_path, atomic_write

CONFIG, METRICS, CURVES, SUMMARY = "config.yaml", "metrics.csv", "curves.png", "summary.json"
LAST, STATE, BEST = "last.safetensors", "last.state.pt", "best.safetensors"
COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "lr", "seconds")


def prepare(out: str | None, name: str, resuming: bool) -> Path:
    """The run folder, created: `out`, or runs/<name>-<time>; a non-empty one is reused only when resuming."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run = Path("runs") / f"{name}-{stamp}"
        for i in range(1, 1000):  # several runs started in the same second
            if not run.exists():
                break
            run = run.with_name(f"{name}-{stamp}-{i}")
    else:
        run = Path(out)
    if not resuming and run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise FileExistsError(f"--out {run} already exists and is not empty: pass --resume {run} to continue it, "
                              "or choose a new --out")
    run.mkdir(parents=True, exist_ok=True)
    return run


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} was refused, not unpickled ({refusal(e)}): it is not a bixt training state") \
            from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable training state ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "epoch" not in state or "weights_crc" not in state:
        raise ValueError(f"{path} is not a bixt training state (no epoch / weights_crc entries)")
    weights = read_state_dict(run / LAST)
    if weights_crc(weights) != state["weights_crc"]:
        raise ValueError(f"{run / LAST} does not belong with {path} (the run was stopped between the two renames, "
                         "or a file was replaced): restart the run, or train from best.safetensors")
    return weights, state


def write_metrics(run: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items() if k in COLUMNS})
    atomic_write(run / METRICS, buf.getvalue().encode())


def read_metrics(run: Path) -> list[dict]:
    with open(run / METRICS, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(run: Path, rows: list[dict], title: str = "") -> None:
    """curves.png: loss (left) and accuracy (right) per epoch, train and test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "top-1 accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", ms=3, label="train")
        ax.plot(epochs, [r[f"test_{key}"] for r in rows], "o-", ms=3, label="test")
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
