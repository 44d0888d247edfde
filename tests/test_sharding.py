"""Token sharding (bixt.nn.sharding): 2 gloo processes, each holding part of every sample's tokens, compute what
one process computes: logits, token features, and every parameter's gradient after the mean over the processes
(DDP's reduction), to 1e-5 in float32. Images (bands of token rows with the overlapping patches' halo), points,
sequences; padding masks (one process's whole part of a sample padded); the math and fused backends; the sequential
and iterative ablations; drop-path and gradient checkpointing; uneven shards. Then `bixt train --shard-tokens 2`
under torchrun against one process, and a sharded run stopped and resumed against an uninterrupted one."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_one_line_error
from test_train import ENV, TINY, assert_same_run, columns, max_diff
from typer.testing import CliRunner

from bixt.models.registry import create_model
from bixt.nn.sharding import TokenShard, comm_bytes, reset_comm
from bixt.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"dim": 32, "depth": 3, "heads": 2, "num_latents": 8, "drop_path_rate": 0.1}
# name -> (model, overrides, input maker (B fixed), padding-mask maker or None). Token counts are odd on purpose:
# the two processes' parts differ in size.
CASES = {
    "image": ("bixt_digits", {**SMALL, "img_size": 10}, lambda: torch.randn(3, 1, 10, 10), None),
    "image-p16": ("bixt_digits", {**SMALL, "img_size": 12, "patch_size": 4, "stride": 4, "dense_classes": 3},
                  lambda: torch.randn(2, 1, 12, 12), None),
    # 8 x 8 patches every 2 pixels: the halo (3 pixels) is wider than a token row
    "image-halo": ("bixt_digits", {**SMALL, "img_size": 12, "patch_size": 8}, lambda: torch.randn(2, 1, 12, 12), None),
    "points": ("bixt_shapes", {**SMALL, "dense_classes": 5}, lambda: torch.rand(3, 37, 3) * 2 - 1,
               lambda n: torch.arange(n)[None, :] >= torch.tensor([[37], [30], [21]])),
    # sample 0: all of the first process's part padded; sample 1: a padded tail across both parts
    "sequence": ("bixt_bytes", {**SMALL, "seq_len": 45}, lambda: torch.randint(256, (2, 45)),
                 lambda n: torch.stack([torch.arange(n) < 22, torch.arange(n) >= 15])),
    "sequential": ("bixt_shapes", {**SMALL, "cross_attention": "sequential"}, lambda: torch.rand(2, 33, 3) * 2 - 1,
                   None),
    "iterative": ("bixt_shapes", {**SMALL, "cross_attention": "iterative"}, lambda: torch.rand(2, 33, 3) * 2 - 1,
                  None),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(model, x, mask):
    """(logits, per-token logits or None) in one forward."""
    if not model.cfg.dense_classes:
        return model(x, padding_mask=mask), None
    lat, tok = model.forward_features(x, mask, return_tokens=True)
    return model.forward_head(lat), model.dense_head(model.dense_norm(tok))


def _run(model, x, mask, w_cls, w_tok, seed_scale):
    torch.manual_seed(1)  # drop-path: the same masks in both runs
    logits, tokens = _forward(model, x, mask)
    loss = (logits * w_cls).sum()
    if tokens is not None:  # a per-token loss on this process's tokens, seeded P times (bixt.nn.sharding)
        loss = loss + seed_scale * (tokens * w_tok).sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return logits.detach(), None if tokens is None else tokens.detach()


def _check_case(name: str, backend: str, grad_ckpt: bool, rank: int, world: int) -> dict:
    model_name, overrides, make_x, make_mask = CASES[name]
    torch.manual_seed(0)
    model = create_model(model_name, attn_backend=backend, **overrides).train()
    model.set_grad_checkpointing(grad_ckpt)
    x = make_x()
    total = model.tokenizer.token_span(x, TokenShard(0, 1))[2]
    mask = None if make_mask is None else make_mask(total)
    w_cls = torch.randn(x.shape[0], model.num_classes)
    w_tok = torch.randn(x.shape[0], total, max(model.cfg.dense_classes, 1))
    logits_ref, tok_ref = _run(model, x, mask, w_cls, w_tok, 1)
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}

    shard = TokenShard(rank, world)
    start, stop, _ = model.tokenizer.token_span(x, shard)
    reset_comm()
    model.shard_tokens(shard)
    logits, tok = _run(model, x, mask, w_cls, w_tok[:, start:stop], world)
    sent = comm_bytes()
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    if tok is not None:
        torch.testing.assert_close(tok, tok_ref[:, start:stop], rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g / world, grads_ref[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    return {"tokens": stop - start, "bytes": sent}


def _worker(rank: int, world: int, port: int, jobs: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {f"{n}/{b}/{c}": _check_case(n, b, c, rank, world) for n, b, c in jobs}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _spawn(jobs: list, tmp_path, world: int = 2) -> list[dict]:
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(world, _free_port(), jobs, out), nprocs=world, join=True)
    return [json.loads(open(f"{out}.{r}").read()) for r in range(world)]


@pytest.mark.slow
def test_sharded_forward_and_gradients_equal_one_process(tmp_path):
    jobs = [(name, backend, False) for name in CASES for backend in ("math", "fused")]
    jobs += [("points", "fused", True), ("image", "auto", True)]
    ranks = _spawn(jobs, tmp_path)
    # Uneven parts, and communication that does not depend on the number of tokens: the same bytes on both
    # processes although one holds more tokens.
    assert ranks[0]["image/math/False"]["tokens"] == 2 * 5 and ranks[1]["image/math/False"]["tokens"] == 3 * 5
    for key in ranks[0]:
        assert ranks[0][key]["bytes"] == ranks[1][key]["bytes"] > 0, key


@pytest.mark.slow
def test_three_processes_and_communication_constant_in_tokens(tmp_path):
    ranks = _spawn([("points", "fused", False), ("sequence", "math", False), ("image-halo", "math", False)], tmp_path,
                   world=3)
    assert [r["points/fused/False"]["tokens"] for r in ranks] == [12, 12, 13]


def test_bytes_do_not_grow_with_the_tokens():
    """A group of one process: the same model at two lengths all-reduces the same bytes, forward and backward."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sent = []
        for n in (40, 400):
            torch.manual_seed(0)
            model = create_model("bixt_shapes", **SMALL).shard_tokens(TokenShard(0, 1))
            reset_comm()
            model(torch.rand(2, n, 3) * 2 - 1).sum().backward()
            sent.append(comm_bytes())
    finally:
        dist.destroy_process_group()
    # per layer, sample, head and latent: d + 1 sums and at most one max forward, d gradients backward
    batch, heads, latents, d, layers = 2, 2, 8, 32 // 2, 3
    assert sent[0] == sent[1]
    per_unit = layers * batch * heads * latents * 4
    assert per_unit * (2 * d + 1) <= sent[0] <= per_unit * (2 * d + 2)


def test_bad_sharding_is_refused_in_one_line():
    model = create_model("bixt_shapes", **SMALL)
    with pytest.raises(ValueError, match="drop_rate=0"):
        create_model("bixt_shapes", **SMALL, drop_rate=0.1).shard_tokens(TokenShard(0, 2))
    with pytest.raises(ValueError, match="attention backends"):
        create_model("bixt_shapes", **SMALL, attn_backend="sdpa").shard_tokens(TokenShard(0, 2))
    with pytest.raises(ValueError, match="token sharding is BiXT's"):
        create_model("vit_ti_p16").shard_tokens(TokenShard(0, 2))
    with pytest.raises(ValueError, match="3 points cannot be split over 4 processes"):
        model.shard_tokens(TokenShard(0, 4))(torch.rand(1, 3, 3))


# -- training under torchrun -------------------------------------------------------------------------------------

SHARDED = {**TINY, "model_args": {"dim": 32, "depth": 2, "num_latents": 8, "heads": 2, "drop_path_rate": 0.1},
           "epochs": 2}


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "bixt_cli.main", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """SHARDED trained on one process, and with --shard-tokens 2 under torchrun."""
    root = tmp_path_factory.mktemp("sharded")
    torch.set_num_threads(1)
    train({**SHARDED, "out": str(root / "one")})
    config = root / "sharded.yaml"
    config.write_text(json.dumps(SHARDED))
    proc = _torchrun(["train", "--config", str(config), "--shard-tokens", "2", "--out", str(root / "two")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, config


@pytest.mark.slow
def test_sharded_training_equals_one_process(sharded_run):
    root, _ = sharded_run
    assert_same_run(root / "one", root / "two", epochs=2)


STOP_THEN_RESUME = """
import json, os, signal, sys
from bixt.train import train

def hook(epoch, step, model):
    if epoch == 1 and step == 1 and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGINT)

opts = json.loads(sys.argv[1])
if len(sys.argv) > 2:
    train(None, resume=sys.argv[2])
else:
    train(opts, on_step=hook)
"""


@pytest.mark.slow
def test_sharded_training_stopped_and_resumed_equals_uninterrupted(sharded_run, tmp_path):
    root, _ = sharded_run
    run = tmp_path / "stopped"
    opts = json.dumps({**SHARDED, "shard_tokens": 2, "out": str(run)})
    script = tmp_path / "stop.py"
    script.write_text(STOP_THEN_RESUME)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
              opts]
    proc = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = torch.load(run / "last.state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # both processes stopped after the same step
    proc = subprocess.run([*launch, str(run)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert max_diff(root / "two" / "last.safetensors", run / "last.safetensors") <= 1e-6
    assert columns(run) == columns(root / "two")


def test_shard_tokens_without_enough_processes_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="launch a multiple of 2 processes"):
        train({**SHARDED, "shard_tokens": 2, "out": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()



@pytest.mark.slow
def test_tokens_times_samples_grid_equals_one_process(tmp_path):
    """4 processes: 2 share each sample's tokens, 2 such pairs split the batch. Without drop-path: data-parallel
    processes draw their own masks, so only the deterministic run can equal one process (as in test_ddp)."""
    opts = {**SHARDED, "model_args": {**SHARDED["model_args"], "drop_path_rate": 0.0}}
    torch.set_num_threads(1)
    train({**opts, "out": str(tmp_path / "one")})
    config = tmp_path / "grid.yaml"
    config.write_text(json.dumps(opts))
    proc = _torchrun(["train", "--config", str(config), "--shard-tokens", "2", "--out", str(tmp_path / "grid")], 4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_run(tmp_path / "one", tmp_path / "grid", epochs=2)


@pytest.mark.slow
def test_profile_reports_every_process_and_constant_communication():
    rows = {}
    for n in (64, 256):
        proc = _torchrun(["profile", "-m", "bixt_shapes", "--seq-len", str(n), "--mode", "train", "--shard-tokens",
                          "2", "--quick", "--json", "--model-arg", "depth=2", "--model-arg", "dim=32"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert [(r["rank"], r["tokens"]) for r in rows[n]] == [(0, n // 2), (1, n // 2)]
        assert all(r["peak_mem_mib"] > 0 and r["step_ms"] > 0 for r in rows[n])
        params = sum(p.numel() for p in create_model("bixt_shapes", depth=2, dim=32).parameters())
        assert rows[n][0]["grad_comm_bytes_per_step"] == 4 * params
    assert rows[64][0]["model_comm_bytes_per_layer"] == rows[256][0]["model_comm_bytes_per_layer"] > 0


def test_profile_shard_tokens_needs_its_processes():
    from bixt_cli.main import app

    runner = CliRunner()
    assert_one_line_error(runner.invoke(app, ["profile", "-m", "bixt_shapes", "--seq-len", "64", "--shard-tokens",
                                              "2"]), "--shard-tokens 2 needs 2 processes")
    assert_one_line_error(runner.invoke(app, ["profile", "-m", "vit_ti_points", "--seq-len", "64", "--shard-tokens",
                                              "1"]), "token sharding is BiXT's")
    assert_one_line_error(runner.invoke(app, ["train", "--data", "shapes:points=32,train=64,test=32", "--shard-tokens",
                                              "2"]), "launch a multiple of 2 processes")
