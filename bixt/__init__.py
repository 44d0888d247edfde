"""BiXT: the Bi-Directional Cross-Attention Transformer (Hiller et al., NeurIPS 2024)."""
from bixt.attention import BACKENDS, BiDirectionalCrossAttention, bidirectional_attention
from bixt.checkpoint import load_checkpoint, save_weights
from bixt.configs import CONFIGS, BiXTConfig
from bixt.model import BiXT
from bixt.registry import create_model, list_models, register_family

register_family("bixt", CONFIGS, BiXT)

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BiDirectionalCrossAttention", "BiXT", "BiXTConfig", "bidirectional_attention",
           "create_model", "list_models", "load_checkpoint", "register_family", "save_weights"]
