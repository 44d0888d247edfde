"""torchrun with 2 processes (gloo on CPU) and the global batch split between them computes what 1 process with
the whole batch computes: after 4 steps, same weights (1e-5), same metrics, one set of files written by rank 0."""
import json
import subprocess
import sys

import pytest
import torch
from test_train import ENV, TINY, assert_same_run

from bixt.train import train


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    opts = {**TINY, "model_args": {"dim": 32, "depth": 2, "num_latents": 8, "heads": 2}, "epochs": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train({**opts, "out": str(tmp_path / "one")})
    finally:
        torch.set_num_threads(threads)
    config = tmp_path / "ddp.yaml"
    config.write_text(json.dumps(opts))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "bixt_cli.main", "train", "--config", str(config), "--out", str(tmp_path / "two")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("best test acc") == 1  # rank 0 alone reports
    assert_same_run(tmp_path / "one", tmp_path / "two", epochs=1)
