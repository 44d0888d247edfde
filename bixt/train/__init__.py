"""Training and evaluation: `bixt train` (loop.py) and `bixt eval` (eval.py).

  config.py        TrainConfig, config files and their precedence
  build.py         a model config and a data set sized for each other
  engine.py        optimizer, schedule, batches, train_one_epoch, evaluate / validate
  state.py         TrainState: what a resume restores beside weights, optimizer and RNG
  checkpointer.py  what the loop writes to the run folder, and when
  terminal.py      the progress display and Ctrl-C
  rundir.py        the run folder's files
  distributed.py   torchrun's processes
  loop.py          train(): the loop itself
  eval.py          `bixt eval`
"""
from bixt.train.config import TrainConfig, read_config_file, resolve_config
from bixt.train.engine import TrainingDiverged
from bixt.train.eval import evaluate_checkpoint
from bixt.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "evaluate_checkpoint", "read_config_file",
           "resolve_config", "train"]
