from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "official_bixt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tune_cache(monkeypatch):
    """`auto` on its built-in thresholds, whatever `bixt tune` cached on the machine running the tests (subprocesses
    inherit it); tests/test_tune.py lifts it."""
    monkeypatch.setenv("BIXT_NO_TUNE_CACHE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models
    gain nothing from more, and runs compared to 1e-6 across processes must reduce in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fixture_names() -> list[str]:
    names = sorted(p.stem for p in FIXTURES.glob("*.pt"))
    assert names, f"no parity fixtures found in {FIXTURES}: they are vendored in the repository (tests/fixtures)"
    return names


def assert_one_line_error(result, message: str) -> None:
    """A CLI run refused bad input as the project promises: exit 2, one line naming `message`, no traceback."""
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def tiny_config(**overrides):
    """A BiXT small enough for unit tests (2 layers, dim 32, 8 latents)."""
    from bixt import BiXTConfig

    base = dict(dim=32, heads=2, depth=2, num_latents=8, img_size=32, num_classes=5)
    return BiXTConfig(**{**base, **overrides})


def assert_padding_changes_nothing(model, pts, keep: int) -> None:
    """Sample 0 padded after `keep` points: moving its padded points changes no output, and the output equals
    running that sample alone on its real points."""
    mask = torch.zeros(pts.shape[:2], dtype=torch.bool)
    mask[0, keep:] = True
    with torch.no_grad():
        out = model(pts, padding_mask=mask)
        moved = pts.clone()
        moved[0, keep:] = 5.0
        torch.testing.assert_close(model(moved, padding_mask=mask), out, atol=0, rtol=0)
        torch.testing.assert_close(model(pts[:1, :keep]), out[:1], atol=1e-5, rtol=1e-5)
