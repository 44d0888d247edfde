"""`bixt profile --shard-tokens P`: per-process peak memory, step time and bytes all-reduced of a token-sharded BiXT
(bixt.nn.sharding), run under torchrun with P processes (P = 1: the same measurement on one process, no launcher).

Every process builds the same seeded model and input and measures its own part in place (torchrun's processes
are fresh): the first step's peak memory over the memory after model creation (bixt.measure.memory.PeakMemory),
then the median of the timed steps (`Plan`, as `bixt profile`). A training step is forward, mean of the logits as
loss, backward with the mean of the gradients over the processes (DDP, as `bixt train --shard-tokens`), AdamW. Bytes
are the payload this process all-reduces per step: the model's (constant in the number of tokens) and the
gradients' (the parameter count); a ring all-reduce sends about twice the payload x (P - 1) / P per process.
"""
from __future__ import annotations

import os
import statistics

import torch
import torch.distributed as dist
from torch import nn

from bixt.measure.memory import PeakMemory
from bixt.measure.profile import DTYPES, Plan, Setup, prepare, time_step
from bixt.nn.sharding import TokenShard, comm_bytes, reset_comm


def join(shard: int, device: torch.device) -> TokenShard | None:
    """torchrun's processes -> a TokenShard over all of them (None for one process); refuses a mismatch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != shard:
        raise ValueError(f"--shard-tokens {shard} needs {shard} processes, this job has {world}: launch with "
                         f"torchrun --nproc_per_node {shard} -m bixt_cli.main profile ... (or pass --shard-tokens "
                         f"{world})")
    if shard == 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return TokenShard(dist.get_rank(), shard)


def _steps(model: torch.nn.Module, x: torch.Tensor, mode: str, shard: TokenShard | None):
    """(step function, bytes of one step's gradient all-reduce)."""
    if mode == "infer":
        model.eval()

        def infer():
            with torch.inference_mode():
                model(x)
        return infer, 0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net, grad_bytes = model, 0
    if shard is not None:  # as `bixt train --shard-tokens`: DDP's mean of the gradients makes them exact
        net = nn.parallel.DistributedDataParallel(model, process_group=shard.group, gradient_as_bucket_view=True)
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    def train():
        net(x).float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train, grad_bytes


def measure_mode(setup: Setup, mode: str, plan: Plan, shard: TokenShard | None) -> dict:
    """This process's figures for one mode."""
    prep = prepare(setup)
    device, dtype = torch.device(setup.device), DTYPES[setup.dtype]
    torch.manual_seed(0)  # the same weights and input on every process
    model = prep.build().to(device=device, dtype=dtype)
    x = model.tokenizer.example_input(setup.batch_size, setup.seq_len, device=device, dtype=dtype)
    model.set_grad_checkpointing(setup.grad_checkpointing)
    if shard is not None:
        model.shard_tokens(shard)
    step, grad_bytes = _steps(model, x, mode, shard)

    def timed() -> float:
        if shard is not None:
            dist.barrier(group=shard.group)  # time the step, not a wait for the slowest process's last one
        return time_step(step, device)

    def agree(want: bool) -> bool:
        """Whether any process wants another step: they must all take the same steps, or the collectives of one
        process's step would pair with another's next call."""
        if shard is None:
            return want
        flag = torch.tensor([float(want)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=shard.group)
        return bool(flag.item())

    reset_comm()
    with PeakMemory(device) as first:
        warm = timed()
    model_bytes = comm_bytes()
    while agree(warm < plan.warmup_s):
        warm += timed()
    times = [timed()]
    while agree(plan.more(times)):
        times.append(timed())
    span = model.tokenizer.token_span(x, shard or TokenShard(0, 1))
    depth = getattr(prep.config, "depth", 1)
    step_s = statistics.median(times)
    return {"mode": mode, "rank": shard.rank if shard else 0, "processes": shard.world if shard else 1,
            "tokens": span[1] - span[0], "seq_len": setup.seq_len, "peak_mem_mib": first.peak_mib,
            "mem_method": first.method, "step_ms": step_s * 1e3, "iters": len(times),
            "comm_bytes_per_step": model_bytes + grad_bytes, "model_comm_bytes_per_step": model_bytes,
            "model_comm_bytes_per_layer": model_bytes / depth, "grad_comm_bytes_per_step": grad_bytes,
            "threads": torch.get_num_threads()}


def profile_sharded(setup: Setup, shard: int, modes: tuple[str, ...], plan: Plan) -> list[dict]:
    """Every process's rows (one per mode), on every process, in rank order."""
    if shard < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {shard}: pass the number of processes per sample")
    if setup.compile:  # the sharded attention's collectives are not checked under compile
        raise ValueError("--compile does not run with --shard-tokens: drop one of them")
    prep = prepare(setup)
    with torch.device("meta"):  # refuses a model that cannot shard (a baseline, dropout, a backend) before joining
        prep.build().shard_tokens(TokenShard(0, shard))
    me = join(shard, torch.device(setup.device))
    if me is None:
        return [measure_mode(setup, mode, plan, None) for mode in modes]
    try:
        rows = [measure_mode(setup, mode, plan, me) for mode in modes]
        gathered: list = [None] * me.world
        dist.all_gather_object(gathered, rows)
        return [row for rank_rows in gathered for row in rank_rows]
    finally:
        dist.destroy_process_group()
