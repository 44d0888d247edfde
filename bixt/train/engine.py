"""The pieces of a training loop: parameter groups, optimizer and schedule, the batches of an epoch, evaluation."""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from bixt.train.distributed import Dist, all_sum

_DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of Linear, Conv and Embedding layers only: norms, biases, latents, class
    tokens, learned position tables and LayerScale gains are left undecayed (as timm and the authors do)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if isinstance(module, _DECAYED) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_lr: float) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up from 1 % of the lr, then cosine down to `min_lr` (torch's schedulers)."""
    sched = torch.optim.lr_scheduler
    base = opt.param_groups[0]["lr"]
    cosine = sched.CosineAnnealingLR(opt, T_max=max(total_steps - warmup_steps, 1), eta_min=min(min_lr, base))
    if warmup_steps <= 0:
        return cosine
    warmup = sched.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warmup_steps)
    return sched.SequentialLR(opt, [warmup, cosine], milestones=[warmup_steps])


def steps_per_epoch(n: int, batch_size: int, d: Dist) -> int:
    """Full batches per process per epoch (the sampler pads the data to a multiple of the world size)."""
    return math.ceil(n / d.world) // (batch_size // d.world)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, d: Dist) -> list[list[int]]:
    """This process's batches of one epoch: a permutation fixed by (seed, epoch), dealt out over the processes.

    With a global batch B split over W processes, batch k of every rank together holds exactly the samples of
    batch k of a single process with batch B, so gradients averaged by DDP equal the single-process ones.
    """
    sampler = DistributedSampler(range(n), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    per = batch_size // d.world
    return [idx[i:i + per] for i in range(0, steps_per_epoch(n, batch_size, d) * per, per)]


def loader(dataset: Dataset, batches: list[list[int]], workers: int, device: torch.device) -> DataLoader:
    # A generator of its own: a DataLoader otherwise draws its workers' base seed from the global RNG, which
    # would shift dropout's random stream between a run and its resume from the middle of an epoch.
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                      collate_fn=getattr(dataset, "collate", default_collate), pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(0))


def predict(model: nn.Module, x: Tensor, pad_id: int | None = None) -> Tensor:
    """model(x); for sequences of ids padded with `pad_id`, with the padding passed as the model's mask."""
    return model(x) if pad_id is None else model(x, padding_mask=x == pad_id)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, d: Dist, *, amp_dtype: torch.dtype | None = None,
             workers: int = 0, pad_id: int | None = None) -> dict:
    """Top-1, top-5 (top-k for k = min(5, classes)), mean cross-entropy and samples/s over the whole split.

    Each process takes every world-th sample (no padding), and the sums are reduced, so the numbers are exact.
    """
    model.eval()
    idx = list(range(d.rank, len(dataset), d.world))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, samples
    start = time.perf_counter()
    autocast = torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for x, y in loader(dataset, batches, workers, d.device):
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            logits = predict(model, x, pad_id).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == y[:, None]
            sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
            sums[1] += hits[:, 0].sum().item()
            sums[2] += hits.any(dim=1).sum().item()
            sums[3] += len(y)
    seconds = time.perf_counter() - start
    loss, top1, top5, n = all_sum(d, sums)
    n = max(n, 1)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "samples": int(n), "seconds": seconds,
            "samples_per_s": n / max(seconds, 1e-9)}
