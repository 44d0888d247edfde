"""Training and evaluation: `bixt train` (loop.py) and `bixt eval` (evaluate.py)."""
from bixt.train.evaluate import evaluate_checkpoint
from bixt.train.loop import TrainConfig, TrainingDiverged, TrainResult, read_config_file, resolve_config, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "evaluate_checkpoint", "read_config_file",
           "resolve_config", "train"]
