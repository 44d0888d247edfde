"""Baselines run on the same inputs as BiXT (ViT, Perceiver, attention ablations): registered on import."""
from baselines.perceiver import CONFIGS as PERCEIVER_CONFIGS
from baselines.perceiver import Perceiver, PerceiverConfig
from baselines.vit import CONFIGS as VIT_CONFIGS
from baselines.vit import ViT, ViTConfig
from bixt.configs import ABLATION_CONFIGS
from bixt.model import BiXT
from bixt.registry import register_family

register_family("vit", VIT_CONFIGS, ViT)
register_family("perceiver", PERCEIVER_CONFIGS, Perceiver)
# The paper's Table 1 attention patterns are settings of the one BiXT class.
register_family("bixt-ablation", ABLATION_CONFIGS, BiXT)

__all__ = ["Perceiver", "PerceiverConfig", "ViT", "ViTConfig"]
