"""Model configs, the families' models and the registry. Importing this package registers the BiXT families; the
baselines (`bixt_baselines`) register when the registry is first asked for a name."""
from bixt.models.bixt import BiXT
from bixt.models.bixt_configs import ABLATION_CONFIGS, CONFIGS, BiXTConfig
from bixt.models.config import ModelConfig
from bixt.models.registry import (
    count_params,
    create_model,
    families,
    get_entry,
    list_models,
    model_config,
    register_family,
)

__all__ = ["ABLATION_CONFIGS", "CONFIGS", "BiXT", "BiXTConfig", "ModelConfig", "count_params", "create_model",
           "families", "get_entry", "list_models", "model_config", "register_family"]
