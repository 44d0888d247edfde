"""One process or many: torchrun's environment -> a process group (gloo on CPU, NCCL on CUDA), and the few
collectives training needs. Without torchrun everything here is a no-op with world size 1.

With token sharding (--shard-tokens P) the processes form a grid: consecutive groups of P processes share each
sample's tokens (bixt.nn.sharding), and the world / P groups split the batch between them (data parallelism)."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    shard: int = 1  # processes per sample (token sharding)
    token_group: object = None  # their process group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which part of the batch this process works on."""
        return self.rank // self.shard

    @property
    def data_world(self) -> int:
        """Into how many parts the batch is split."""
        return self.world // self.shard

    @property
    def weight(self) -> float:
        """1 on one process per sample, 0 on the others: counts summed over the processes count a sample once."""
        return float(self.rank % self.shard == 0)

    def token_shard(self):
        """This process's bixt.nn.sharding.TokenShard (None without token sharding)."""
        from bixt.nn.sharding import TokenShard

        return TokenShard(self.rank % self.shard, self.shard, self.token_group) if self.shard > 1 else None

    @property
    def active(self) -> bool:
        return self.world > 1


def resolve_device(device: str | None) -> torch.device:
    """cpu, cuda or cuda:N; None picks CUDA when it is there. Raises when CUDA is asked for and absent."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this PyTorch sees no CUDA device: use --device cpu "
                         "(or install a CUDA build of torch)")
    return dev


def setup(device: str | None, shard_tokens: int = 1) -> Dist:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1), else a single process; with
    `shard_tokens` P > 1, every P consecutive processes share each sample's tokens."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard_tokens < 1 or world % shard_tokens:
        raise ValueError(f"--shard-tokens {shard_tokens} does not divide the {world} process(es): launch a multiple "
                         f"of {shard_tokens} processes (torchrun --nproc_per_node {max(shard_tokens, 1)} ...)")
    if world <= 1:
        return Dist(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    group = None
    if shard_tokens > 1:  # every process creates every group (new_group is collective); keeps its own
        for first in range(0, world, shard_tokens):
            g = dist.new_group(list(range(first, first + shard_tokens)))
            group = g if first <= rank < first + shard_tokens else group
    return Dist(rank, world, local, dev, shard_tokens, group)


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum a few numbers over all processes (float64, so counts stay exact)."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def broadcast(d: Dist, obj):
    """Rank 0's `obj` on every rank (small picklable values only: a config, an error message)."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(d: Dist, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def on_main(d: Dist, fn: Callable):
    """`fn()` run on rank 0 alone, its result (or the user error it raised) handed to every rank."""
    result, error = None, None
    if d.main:
        try:
            result = fn()
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as e:
            error = e
    result, error = broadcast(d, (result, error))
    if error is not None:
        raise error
    return result
