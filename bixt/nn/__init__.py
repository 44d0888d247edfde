"""Building blocks with no notion of a model family: layers, positional features, tokenizers, the attention math with
its backends (`attention.py`; the single-pass CPU backend in `fused.py`), and the process settings that math runs
under (`precision.py`: what --amp means here; `allocator.py`: glibc's malloc for CPU tensors)."""
