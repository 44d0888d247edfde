"""What every model family shares: the forward contract, backend switching, and the latent-pooling head.

    model(x, padding_mask=None)     logits (B, num_classes); a dense-only model (num_classes=0, dense_classes=K) gives
                                    per-token logits (B, N, K)
    forward_features(x, mask)       the family's features (BiXT and Perceiver: latents; ViT: all tokens)
    forward_head(features)          logits from those features (pre_logits=True: the pooled vector)
    forward_dense(x, mask)          per-token logits (B, N, dense_classes) from `token_features`
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bixt.nn.attention import check_backend
from bixt.nn.layers import classifier, layer_norm


class Model(nn.Module):
    """Base of every family. A subclass builds its layers, then calls `init_weights`, and implements
    `forward_features`, `forward_head` and, if it has per-token outputs, `token_features`."""

    no_dense = "this model has no dense head: create it with dense_classes=K for per-token logits"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dim
        self.grad_checkpointing = False  # timm's name: layers recompute their activations in backward

    def set_grad_checkpointing(self, enable: bool = True) -> Model:
        """Keep only each layer's inputs in training and recompute the rest in backward (timm's API): memory for
        one layer's activations instead of all of them, for one more forward's time."""
        self.grad_checkpointing = bool(enable)
        return self

    def run_layer(self, layer: nn.Module, *args):
        """layer(*args), checkpointed where set_grad_checkpointing is on and a backward may follow. Non-reentrant
        (it accepts None arguments, tuples out, custom autograd Functions) with the RNG state replayed, so
        drop-path and dropout draw the same masks in the recomputation: gradients are those of the plain run."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=True)
        return layer(*args)

    def shard_tokens(self, shard) -> Model:
        """Token sharding (bixt.nn.sharding): this process computes only its part of every sample's tokens."""
        raise ValueError(f"{type(self).__name__} cannot shard its tokens across processes: token sharding is BiXT's "
                         "(a bixt or bixt-ablation model)")

    def set_backend(self, backend: str) -> Model:
        """Switch every attention op to `backend` (see bixt.nn.attention.BACKENDS)."""
        check_backend(backend)
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        return self

    def token_features(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, N, width) per-token features for the dense head."""
        raise ValueError(self.no_dense)

    def forward_dense(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if not self.cfg.dense_classes:
            raise ValueError(self.no_dense)
        return self.dense_head(self.token_features(x, padding_mask))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if self.cfg.dense_classes and not self.cfg.num_classes:
            return self.forward_dense(x, padding_mask)
        return self.forward_head(self.forward_features(x, padding_mask))


class LatentModel(Model):
    """A model whose features are a latent array (B, M, dim): classified from the latents' mean, then LayerNorm and
    Linear (the authors' fc_norm; there is no norm before pooling)."""

    def build_head(self) -> None:
        """fc_norm and head; called where the subclass's layer order puts them (it fixes the state dict's order)."""
        self.fc_norm = layer_norm(self.cfg.dim)
        self.head = classifier(self.cfg.dim, self.cfg.num_classes)

    def forward_head(self, latents: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.fc_norm(latents.mean(dim=1))
        return x if pre_logits else self.head(x)


@torch.no_grad()
def jax_init_(model: nn.Module, zero: tuple[str, ...] = ("head", "dense_head")) -> None:
    """The authors' "jax" init (timm's): xavier-uniform Linear weights, zero biases (normal 1e-6 in MLPs), the
    modules named in `zero` all zeros, lecun-normal convs."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if name in zero:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
                continue
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=1e-6) if "mlp" in name else nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            # lecun normal, truncated at 2 std with the std corrected for the truncation (as timm).
            std = math.sqrt(1.0 / m.weight[0].numel()) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
