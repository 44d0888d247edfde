"""Building blocks with no notion of a model family: layers, positional features, tokenizers, and the attention
math with its backends (`attention.py`; the single-pass CPU backend in `fused.py`)."""
