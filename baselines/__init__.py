"""Baselines run on the same inputs as BiXT (ViT, Perceiver, attention ablations): registered on import."""
