"""Weights in and out, safely (nothing but tensors is ever unpickled), and atomic file writes."""
from bixt.io.atomic import atomic_path, atomic_write
from bixt.io.checkpoint import load_checkpoint, read_state_dict, save_weights

__all__ = ["atomic_path", "atomic_write", "load_checkpoint", "read_state_dict", "save_weights"]
