"""`bixt_baselines`: ViT and the Perceiver on the same inputs as BiXT. Installed under that name from this folder
(PyPI's `baselines` is another project); each module registers its family on import."""
from bixt_baselines.perceiver import Perceiver, PerceiverConfig
from bixt_baselines.vit import ViT, ViTConfig

__all__ = ["Perceiver", "PerceiverConfig", "ViT", "ViTConfig"]
