"""bixt.nn.allocator: the tuned glibc setting really keeps CPU steps from page-faulting their memory afresh, the lean
one really hands it back (page faults counted, not timed), BIXT_MALLOC overrides both, a wrong value is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bixt.nn import allocator

glibc_only = pytest.mark.skipif(not allocator._is_glibc(), reason="the setting is glibc's")

# Minor page faults per step of a step-like loop: 12 hidden layers of 3 MiB kept (as activations for a backward), then
# all freed at the end of the step.
FAULTS = """
import json, resource, sys, torch
from bixt.nn.allocator import tune_allocator
mode = tune_allocator(lean=sys.argv[1] == "lean")
x, w = torch.randn(1024, 192), torch.randn(768, 192)
def step():
    kept = [torch.nn.functional.gelu(x @ w.t()) for _ in range(12)]
    return sum(h.sum() for h in kept)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"mode": mode, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10}))
"""


def _faults(malloc: str | None, lean: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "BIXT_MALLOC"))}
    env.update({"BIXT_MALLOC": malloc} if malloc else {})
    out = subprocess.run([sys.executable, "-c", FAULTS, "lean" if lean else "tuned"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc_only
def test_tuned_setting_reuses_mapped_memory_and_lean_hands_it_back():
    tuned, default, lean = _faults(None), _faults("glibc"), _faults(None, lean=True)
    assert (tuned["mode"], default["mode"], lean["mode"]) == ("tuned", "glibc", "lean")
    # glibc's defaults fault in every 3 MiB block afresh: thousands of faults a step; the tuned heap a handful. The
    # lean setting maps every block afresh, on purpose: the resident set follows what is live.
    assert default["faults"] > 1000 and lean["faults"] > 1000
    assert tuned["faults"] * 10 < default["faults"]
    assert _faults("tuned", lean=True)["mode"] == "tuned"  # BIXT_MALLOC has the last word


def test_mode(monkeypatch):
    monkeypatch.delenv("BIXT_MALLOC", raising=False)
    assert (allocator.allocator_mode(), allocator.allocator_mode(lean=True)) == ("tuned", "lean")
    monkeypatch.setenv("BIXT_MALLOC", "glibc")
    assert allocator.tune_allocator(lean=True) == "glibc"
    monkeypatch.setenv("BIXT_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="BIXT_MALLOC='jemalloc' is not a known allocator setting: use one of"):
        allocator.allocator_mode()


def test_unknown_setting_is_one_line_at_the_cli(monkeypatch):
    from bixt_cli.main import app

    monkeypatch.setenv("BIXT_MALLOC", "jemalloc")
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 2
    assert "BIXT_MALLOC='jemalloc' is not a known allocator setting" in result.output
    assert "Traceback" not in result.output
