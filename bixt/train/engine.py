"""The pieces of a training loop: parameter groups, optimizer and schedule, the batches of an epoch, one epoch of
training (`train_one_epoch`) and evaluation (`evaluate`, `validate`)."""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from bixt.data import Data
from bixt.nn.compile import compile_model
from bixt.train import rundir
from bixt.train.config import TrainConfig
from bixt.train.distributed import Dist, all_sum
from bixt.train.state import StepStats, TrainState
from bixt.train.terminal import Reporter, StopFlag

OnStep = Callable[[int, int, nn.Module], None]  # (epoch, step, model) after every optimizer step
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
    """Full batches per process per epoch (the sampler pads the data to a multiple of the data-parallel size)."""
    return math.ceil(n / d.data_world) // (batch_size // d.data_world)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, d: Dist) -> list[list[int]]:
    """This process's batches of one epoch: a permutation fixed by (seed, epoch), dealt out over the processes.

    With a global batch B split over W processes, batch k of every rank together holds exactly the samples of
    batch k of a single process with batch B, so gradients averaged by DDP equal the single-process ones. The
    processes that shard one sample's tokens get the same batches.
    """
    sampler = DistributedSampler(range(n), num_replicas=d.data_world, rank=d.data_rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    per = batch_size // d.data_world
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


def dense_logits(logits: Tensor, x: Tensor) -> Tensor:
    """Per-token logits (B, N, K) laid out as the labels, classes second: points and sequences (B, K, N); images
    (B, K, H, W), the token grid's logits upsampled bilinearly to the pixels (the paper's linear head)."""
    logits = logits.transpose(1, 2)
    if x.dim() != 4:
        return logits
    (b, k, n), (h, w) = logits.shape, x.shape[-2:]
    s = math.isqrt(h * w // n) if 0 < n <= h * w else 0
    if not s or (h // s) * (w // s) != n:
        raise ValueError(f"{n} per-token outputs are no grid over the {h}x{w} image: dense image models need a "
                         "square token grid (img_size a multiple of the stride)")
    return F.interpolate(logits.reshape(b, k, h // s, w // s), size=(h, w), mode="bilinear", align_corners=False)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed precision when `amp_dtype` is set (--amp), else a no-op context."""
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def eval_batches(n: int, batch_size: int, d: Dist) -> list[list[int]]:
    """This process's evaluation batches: every data_world-th sample, no padding, so sums over processes are exact
    (processes sharing one sample's tokens take the same samples)."""
    idx = list(range(d.data_rank, n, d.data_world))
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, d: Dist, *, amp_dtype: torch.dtype | None = None,
             workers: int = 0, pad_id: int | None = None) -> dict:
    """Top-1, top-5 (top-k for k = min(5, classes)), mean cross-entropy and samples/s over the whole split.

    Each process takes every world-th sample (no padding), and the sums are reduced, so the numbers are exact
    (processes sharding one sample's tokens take the same samples and count them once).
    """
    model.eval()
    batches = eval_batches(len(dataset), batch_size, d)
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, samples
    start = time.perf_counter()
    with torch.no_grad(), autocast(d.device, amp_dtype):
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
    loss, top1, top5, n = all_sum(d, [v * d.weight for v in sums])
    n = max(n, 1)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "samples": int(n), "seconds": seconds,
            "samples_per_s": n / max(seconds, 1e-9)}


def evaluate_dense(model: nn.Module, data: Data, batch_size: int, d: Dist, *, amp_dtype: torch.dtype | None = None,
                   workers: int = 0) -> dict:
    """A dense task's test split: mean cross-entropy and accuracy over the labelled tokens (points, pixels), mIoU
    and, for part segmentation, ShapeNetPart's instance and category mIoU (bixt.train.metrics); "top1" is the
    per-token accuracy, there is no top-5. Exact over processes, as `evaluate`."""
    from bixt.train.metrics import SegmentationMeter

    if d.shard > 1:
        raise ValueError("dense tasks do not run token-sharded: drop --shard-tokens")
    model.eval()
    meter = SegmentationMeter(data.num_classes, data.ignore_index, data.category_parts)
    batches = eval_batches(len(data.test), batch_size, d)
    sums = [0.0, 0.0]  # loss over the labelled tokens, samples
    start = time.perf_counter()
    with torch.no_grad(), autocast(d.device, amp_dtype):
        for x, y in loader(data.test, batches, workers, d.device):
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            logits = dense_logits(predict(model, x, data.pad_id), x).float()
            sums[0] += F.cross_entropy(logits, y, ignore_index=data.ignore_index, reduction="sum").item()
            sums[1] += len(y)
            meter.update(logits, y)
    seconds = time.perf_counter() - start
    meter.to(d.device).sync()  # NCCL reduces device tensors: a process without batches still holds CPU ones
    loss, n = all_sum(d, sums)
    metrics = meter.compute()
    tokens = max(int(meter.confusion.sum()), 1)
    return {"loss": loss / tokens, "top1": metrics["pixel_acc"], "top5": None,
            **{k: v for k, v in metrics.items() if k != "pixel_acc"}, "samples": int(n), "seconds": seconds,
            "samples_per_s": n / max(seconds, 1e-9)}


class TrainingDiverged(RuntimeError):
    """The loss, the gradients, the weights or the test loss became NaN or infinite; the run stopped before
    saving anything of it."""


@dataclass
class Learner:
    """The model and what an optimizer step needs. `net` runs the training forward: the model, or DDP around it,
    torch.compile'd under --compile; `model` is the plain module, which evaluation runs and checkpoints save."""

    model: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    clip_grad: float | None
    d: Dist

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def autocast(self):
        return autocast(self.d.device, self.amp_dtype)

    def step(self, loss: Tensor) -> str | None:
        """One optimizer step. Returns what became non-finite (None: nothing did): the gradient norm, found before
        the update, or a weight after it (a finite loss can still overflow the weights, e.g. with a huge lr)."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad is not None:
            self.scaler.unscale_(self.opt)  # clip the true gradients, not the loss-scaled ones
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            # fp16 loss scaling overflows on purpose now and then: the scaler skips those steps itself.
            if not self.scaler.is_enabled() and not torch.isfinite(norm):
                return f"the gradient norm is {norm.item()}"
        try:
            self.scaler.step(self.opt)
        except RuntimeError as e:  # an lr near float32's limit: the update itself cannot be represented
            if "overflow" not in str(e):
                raise
            return "the weight update overflows float32"
        self.scaler.update()
        self.sched.step()
        name = non_finite_weight(self.model)
        return None if name is None else f"weight {name} is not finite after the update"

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def non_finite_weight(model: nn.Module) -> str | None:
    """The name of a parameter holding inf or NaN, None when all are finite (one device sync in the usual case)."""
    params = [p.detach() for p in model.parameters() if p.numel()]
    if not params:
        return None
    if hasattr(nn.utils, "get_total_norm"):  # torch >= 2.6: the max |w| of all of them in one fused pass
        peak = nn.utils.get_total_norm(params, norm_type=math.inf)
    else:
        peak = torch.stack([p.abs().max().float() for p in params]).max()
    if torch.isfinite(peak):
        return None
    return next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), "?")


def amp_dtype_for(amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on `device` (None without --amp): bf16 on CUDA and on a CPU that computes in
    bf16, fp16 on CUDA without bf16; elsewhere bixt.nn.precision raises a one-line error (before any run folder)."""
    if not amp:
        return None
    from bixt.nn import precision  # looked up per call, so tests can stand in for the CPU probe

    return precision.amp_dtype(device)


def build_learner(cfg: TrainConfig, model: nn.Module, steps: int, d: Dist, ignore_index: int = -100) -> Learner:
    """AdamW with warm-up + cosine per step, autocast when --amp (fp16 with loss scaling where bf16 is missing),
    and DDP over the processes of a torchrun job (its mean of the gradients is also what token sharding needs:
    bixt.nn.sharding)."""
    model.to(d.device)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    total = cfg.epochs * steps
    sched = build_scheduler(opt, total, min(round(cfg.warmup_epochs * steps), total // 2), cfg.min_lr)
    amp_dtype = amp_dtype_for(cfg.amp, d.device)
    # bf16 keeps float32's exponent range, so only fp16 (CUDA without bf16) needs its loss scaled.
    scaler = torch.amp.GradScaler("cuda", enabled=d.device.type == "cuda" and amp_dtype == torch.float16)
    # Gradients as views into DDP's buckets: no second copy of them (a model's size less at every step's peak).
    net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None,
                                              gradient_as_bucket_view=True) if d.active else model
    if cfg.compile:  # DDP compiled whole, as torch recommends; evaluation stays eager: its last, smaller batch
        net = compile_model(net)  # would compile a second graph for a pass that is a fraction of an epoch
    criterion = nn.CrossEntropyLoss(ignore_index=ignore_index, label_smoothing=cfg.label_smoothing)
    return Learner(model, net, opt, sched, scaler, criterion, amp_dtype, cfg.clip_grad, d)


@dataclass
class Throughput:
    """Training samples/s of this session, evaluation left out, and under --compile the wall time of the session's
    first step, which compiles the forward and the backward: `compile_s`, kept out of samples and seconds."""

    samples: int = 0
    seconds: float = 0.0
    compile_s: float | None = None
    compile_samples: int = 0

    @property
    def per_second(self) -> float:
        if not self.samples and self.compile_s:  # the compiling step was the session's only one
            return self.compile_samples / self.compile_s
        return self.samples / max(self.seconds, 1e-9)


def train_one_epoch(cfg: TrainConfig, learner: Learner, data: Data, state: TrainState, *, stop: StopFlag,
                    report: Reporter, speed: Throughput, on_step: OnStep | None = None) -> bool:
    """Train the rest of epoch `state.epoch` from batch `state.step`, recording every step in `state`. Returns
    False when asked to stop (after the step under way, on every process at once), True at the epoch's end."""
    d = learner.d
    data.train.epoch = state.epoch  # augmentation is drawn per (seed, epoch, sample)
    learner.net.train()
    state.start_clock()
    started = time.perf_counter()
    batches = epoch_batches(len(data.train), cfg.batch_size, state.epoch, cfg.seed, d)[state.step:]
    finished = True
    dense = data.task == "segment"
    compiling = cfg.compile and speed.compile_s is None
    for x, y in loader(data.train, batches, data.workers, d.device):
        step_start = time.perf_counter()
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with learner.autocast():
            logits = predict(learner.net, x, data.pad_id)
            logits = dense_logits(logits, x).float() if dense else logits.float()
            loss = learner.criterion(logits, y)
        # dense: the loss is the mean over the labelled tokens (none labelled: a zero loss, not 0/0)
        counted = y != data.ignore_index if dense else torch.ones_like(y, dtype=torch.bool)
        n = counted.sum().item()
        if not n:
            loss = logits.sum() * 0.0
        value = loss.item()
        correct = ((logits.argmax(1) == y) & counted).sum().item()
        # The stop request travels with the step's numbers, so every process stops after the same step.
        w = d.weight  # a sample whose tokens several processes share is counted once
        stats = StepStats(*all_sum(d, [w * value * n, w * correct, w * n, w * len(y), float(not math.isfinite(value)),
                                       float(stop.signum > 0)]))
        if stats.diverged:
            raise _diverged(value, state, Path(cfg.out) / rundir.LAST)
        problem = learner.step(loss)
        # Replicas hold the same weights and gradients, but every process must stop at the same step.
        if all_sum(d, [float(problem is not None)])[0]:
            raise _diverged_update(problem, state, Path(cfg.out) / rundir.LAST)
        state.record_step(stats)
        if compiling:  # the check of the weights after the update has synchronised the device
            speed.compile_s, speed.compile_samples = time.perf_counter() - step_start, int(stats.inputs)
            started += speed.compile_s
            compiling = False
        else:
            speed.samples += int(stats.inputs)
        report.step(state)
        if on_step is not None:
            on_step(state.epoch, state.step, learner.model)
        if stats.stopping:
            finished = False
            break
    speed.seconds += time.perf_counter() - started
    return finished


def validate(cfg: TrainConfig, learner: Learner, data: Data, state: TrainState) -> dict:
    """The test split after epoch `state.epoch`, in batches twice the training's: no activations are kept for a
    backward. A non-finite test loss (finite but huge weights) stops the run before the epoch is saved."""
    batch = max(1, 2 * cfg.batch_size // learner.d.data_world)
    if data.task == "segment":
        test = evaluate_dense(learner.model, data, batch, learner.d, amp_dtype=learner.amp_dtype,
                              workers=data.workers)
    else:
        test = evaluate(learner.model, data.test, batch, learner.d, amp_dtype=learner.amp_dtype,
                        workers=data.workers, pad_id=data.pad_id)
    if not math.isfinite(test["loss"]):
        raise TrainingDiverged(f"test loss is {test['loss']} after epoch {state.epoch + 1}; nothing of that epoch "
                               f"was saved; {_last_good(Path(cfg.out) / rundir.LAST)}")
    return test


def _diverged(value: float, state: TrainState, last: Path) -> TrainingDiverged:
    where = value if not math.isfinite(value) else "non-finite on another process"
    return TrainingDiverged(
        f"loss is {where} at step {state.global_step + 1} (epoch {state.epoch + 1}, batch {state.step + 1}); no "
        f"weight was updated; {_last_good(last)}")


def _diverged_update(problem: str | None, state: TrainState, last: Path) -> TrainingDiverged:
    return TrainingDiverged(
        f"{problem or 'a weight or gradient became non-finite on another process'} at step {state.global_step + 1} "
        f"(epoch {state.epoch + 1}, batch {state.step + 1}); nothing of it was saved; {_last_good(last)}")


def _last_good(last: Path) -> str:
    return f"the last good checkpoint is {last if last.exists() else 'none yet'}: lower --lr or check the data"
