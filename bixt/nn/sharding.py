"""Token sharding (sequence parallelism): P processes hold disjoint spans of the SAME samples' tokens.

BiXT is the architecture where this is cheap. The tokens' update (softmax over the M latents) is local to each
token. The latents' update (softmax over all N tokens) needs only softmax statistics: every process computes, per
latent and head, its partial maximum, sum of exponentials and exp-weighted sum of values over its own tokens, and
one all-reduce merges them (the split-K merge the fused backend does across threads). That is B x H x M x (d + 1)
numbers per layer, whatever N is. The latents' self-attention, MLPs and the head are small: every process computes
them identically ("replicated").

Gradients. Every process seeds its backward with the loss it computed (a replicated loss as it is). A replicated
tensor's gradient then arrives on each process in shares that sum to P times the true gradient; the backward of
the statistics' all-reduce sums the shares (`all_reduce_sum`), so a token's gradient on its own process is P times
the true one as well. Everything is linear in the seed, so the MEAN of the parameter gradients over the P
processes (what DDP computes) is exactly the single-process gradient: the classic trap of counting a replicated
computation P times is what that mean undoes. A loss on a process's own tokens (a dense task) is seeded with P
times its part of the global loss. tests/test_sharding.py checks all of it against one process.

All communication goes through torch.distributed collectives on the shard's process group; `comm_bytes()` counts
the payload all-reduced by this process (a ring all-reduce moves 2 (P - 1) / P of it each way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_COMM = {"bytes": 0}
BACKENDS = ("auto", "math", "fused")


@dataclass(frozen=True)
class TokenShard:
    """This process's place among the `world` processes that share each sample's tokens. `group`: their
    torch.distributed process group (None: the default group)."""

    rank: int
    world: int
    group: object = None

    def span(self, units: int, what: str = "tokens") -> tuple[int, int]:
        """This process's contiguous part [start, stop) of `units` (tokens, image rows): as even as can be, the
        first processes one fewer where they do not divide."""
        if units < self.world:
            raise ValueError(f"{units} {what} cannot be split over {self.world} processes: use at most {units} "
                             "processes per sample, or a longer input")
        return units * self.rank // self.world, units * (self.rank + 1) // self.world


def comm_bytes() -> int:
    """Bytes this process has all-reduced for token sharding since the last `reset_comm`."""
    return _COMM["bytes"]


def reset_comm() -> None:
    _COMM["bytes"] = 0


def all_reduce_(t: Tensor, shard: TokenShard, op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce over the shard's processes, counted; no autograd."""
    _COMM["bytes"] += t.numel() * t.element_size()
    dist.all_reduce(t, op=op, group=shard.group)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; backward sums the gradient shares (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, shard: TokenShard) -> Tensor:
        ctx.shard = shard
        return all_reduce_(x.clone(memory_format=torch.contiguous_format), shard)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_reduce_(grad.clone(memory_format=torch.contiguous_format), ctx.shard), None


def all_reduce_sum(x: Tensor, shard: TokenShard) -> Tensor:
    return _AllReduceSum.apply(x, shard)


def merge_online_softmax(acc: Tensor, offset: Tensor, shard: TokenShard) -> tuple[Tensor, Tensor]:
    """Partial online-softmax sums of this process's tokens (`acc`, relative to the base-2 `offset`, which
    broadcasts against it) -> the sums over all processes' tokens, relative to the largest offset. No autograd (the
    fused backend's forward)."""
    top = all_reduce_(offset.clone(), shard, dist.ReduceOp.MAX)
    return all_reduce_((acc * (offset - top).exp2()).contiguous(), shard), top


def softmax_over_shards(scores: Tensor, v: Tensor, shard: TokenShard, key_padding_mask: Tensor | None = None,
                        dropout_p: float = 0.0) -> Tensor:
    """softmax(scores) @ v where the softmax runs over the keys of ALL processes: scores (B, H, L, n) and v
    (B, H, n, d) are this process's keys; returns (B, H, L, d), the same on every process. Autograd-aware."""
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    top = all_reduce_(scores.detach().amax(dim=-1, keepdim=True), shard, dist.ReduceOp.MAX)
    e = (scores - top).exp()  # the max only keeps exp in range: no gradient flows through it
    weights = F.dropout(e, dropout_p) if dropout_p > 0 else e  # dropout of the probabilities: sums stay undropped
    sums = all_reduce_sum(torch.cat((weights @ v, e.sum(dim=-1, keepdim=True)), dim=-1), shard)
    return sums[..., :-1] / sums[..., -1:]


def check_shard_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"token sharding runs on the {', '.join(BACKENDS)} attention backends, not {name!r}: set "
                         "attn_backend to one of them")
    return name
