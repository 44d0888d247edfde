"""BiXT: the Bi-Directional Cross-Attention Transformer (Hiller et al., NeurIPS 2024).

The package is layered; each layer imports only the ones before it:

    bixt.nn        layers, positional features, tokenizers, the attention math and its backends
    bixt.models    configs, BiXT, the registry (families register here; the baselines live in `bixt_baselines`)
    bixt.io        weights in and out (safetensors, the authors' layout through each family's filter), atomic writes
    bixt.data      --data specs, data sets, the procedural sets
    bixt.train     the training loop, run folders, distributed set-up, evaluation
    bixt.measure   MAC counting (every fvcore handle), profiling, the scaling sweep (needs nn and models only)

The names below are loaded on first use, so `import bixt.nn` does not pull in the layers above it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "BACKENDS": "bixt.nn.attention", "BiDirectionalCrossAttention": "bixt.nn.attention",
    "bidirectional_attention": "bixt.nn.attention",
    "BiXT": "bixt.models", "BiXTConfig": "bixt.models", "CONFIGS": "bixt.models",
    "create_model": "bixt.models", "list_models": "bixt.models", "register_family": "bixt.models",
    "load_checkpoint": "bixt.io", "save_weights": "bixt.io",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bixt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
