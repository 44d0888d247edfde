"""`bixt eval`: top-1, top-5, loss and samples/s of a checkpoint on a data split; for dense tasks (segmentation)
per-token accuracy, mIoU and, for part segmentation, ShapeNetPart's instance and category mIoU.

Accepts a run folder of `bixt train` (or a checkpoint inside one: model, overrides and data come from its
config.yaml), a bare weights file of a registered model, and the authors' released BiXT checkpoints
(`model_best.pth.tar`, their key layout; loaded through `bixt.load_checkpoint`, which unpickles no code).
ImageNet-layout folders are evaluated as the authors do: bicubic resize to size / 0.875, centre crop, ImageNet
mean/std (`imagefolder:PATH` with PATH/val/<class>/).
"""
from __future__ import annotations

from pathlib import Path

from bixt.data import check_same_classes
from bixt.io.checkpoint import likely_models, load_checkpoint, read_state_dict
from bixt.train import rundir
from bixt.train.build import build_for_data
from bixt.train.config import read_config_file
from bixt.train.distributed import Dist, resolve_device
from bixt.train.engine import amp_dtype_for, evaluate, evaluate_dense


def find_weights(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """(weights file, run folder or None): a run folder means its best weights (last when there is no best)."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: give a weights file or a `bixt train` run folder")
    if path.is_dir():
        for name in (rundir.BEST, rundir.LAST):
            if (path / name).is_file():
                return path / name, path if (path / rundir.CONFIG).is_file() else None
        raise FileNotFoundError(f"{path} holds no {rundir.BEST} or {rundir.LAST}: is it a `bixt train` run folder?")
    if path.name == rundir.STATE:
        raise ValueError(f"{path} is the optimizer state, not weights: pass {path.with_name(rundir.LAST)} or the run "
                         "folder")
    return path, path.parent if (path.parent / rundir.CONFIG).is_file() else None


def evaluate_checkpoint(checkpoint: str | Path, model: str | None = None, data: str | None = None, *,
                        batch_size: int = 128, device: str | None = None, workers: int | None = None,
                        amp: bool = False) -> dict:
    """Evaluate a checkpoint; returns {model, data, checkpoint, top1, top5, loss, samples, seconds, samples_per_s}
    (dense tasks: top1 per labelled token, top5 None, and miou, with part segmentation instance_miou, class_miou).
    `amp`: under bf16 autocast (fp16 on CUDA without bf16), as `bixt train --amp` evaluates."""
    from bixt.models.registry import get_entry

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    d = Dist(device=resolve_device(device))
    amp_dtype = amp_dtype_for(amp, d.device)  # refused before any weights or data are read
    weights, run = find_weights(checkpoint)
    model_args: dict = {}
    runs_model = False  # evaluating the run's own model: its class names apply
    if run is not None:
        saved = read_config_file(run / rundir.CONFIG)
        if model is None or model == saved.get("model"):
            model, model_args = saved.get("model"), dict(saved.get("model_args") or {})
            runs_model = True
        data = data or saved.get("data")
    if model is None:
        fits = likely_models(read_state_dict(weights))
        if len(fits) != 1 or " with " in fits[0]:
            hint = f"it fits {' or '.join(fits)}" if fits else "no registered BiXT has these shapes"
            raise ValueError(f"which model is {weights}? pass --model NAME ({hint})")
        model = fits[0]
    if data is None:
        raise ValueError(f"no data to evaluate {weights} on: pass --data (e.g. imagefolder:PATH for ImageNet)")
    entry = get_entry(model)
    mcfg, ds, _ = build_for_data(model, model_args, data, augment=False, need_train=False, fit_data=False)
    trained_on = rundir.read_classes(run) if runs_model else None
    if trained_on is not None:  # same count, other names: the labels would mean other classes
        check_same_classes(trained_on, ds.classes)
    net = entry.build(mcfg)
    load_checkpoint(net, weights)
    net.to(d.device)
    workers = ds.workers if workers is None else workers
    if ds.task == "segment":
        result = evaluate_dense(net, ds, batch_size, d, amp_dtype=amp_dtype, workers=workers)
    else:
        result = evaluate(net, ds.test, batch_size, d, amp_dtype=amp_dtype, workers=workers, pad_id=ds.pad_id)
    return {"model": model, "data": str(data), "checkpoint": str(weights), **result}
