from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "official_bixt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fixture_names() -> list[str]:
    names = sorted(p.stem for p in FIXTURES.glob("*.pt"))
    assert names, f"no parity fixtures found in {FIXTURES}: CI needs ../shared beside the checkout"
    return names


def tiny_config(**overrides):
    """A BiXT small enough for unit tests (2 layers, dim 32, 8 latents)."""
    from bixt import BiXTConfig

    base = dict(dim=32, heads=2, depth=2, num_latents=8, img_size=32, num_classes=5)
    return BiXTConfig(**{**base, **overrides})
