"""benchmarks/authors_bixt.py, the yardstick of benchmarks/bench_authors.py, computes what the authors' code computes:
it reproduces their parity fixture, and it equals our model (forward and gradients) on the same weights."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bixt.models.official import bixt_to_official
from bixt.models.registry import create_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "official_bixt"


def _authors_module(name: str = "authors_bixt"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduces_the_authors_parity_fixture():
    args = json.loads((FIXTURES / "tiny_p16.json").read_text())
    fixture = torch.load(FIXTURES / "tiny_p16.pt", weights_only=True)
    model = _authors_module().AuthorsBiXT(
        img_size=args["img_size"], patch_size=args["patch_size"], num_classes=args["num_classes"],
        num_latents=args["num_latents"], dim=args["embed_dim_lat"], depth=args["depth"], heads=args["sa_num_heads"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    with torch.no_grad():
        logits = model.eval()(fixture["input"])
    torch.testing.assert_close(logits, fixture["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "fused"])
def test_equals_our_model_forward_and_gradients(backend):
    torch.manual_seed(0)
    ours = create_model("bixt_ti_l64_p16", img_size=64, depth=3, drop_path_rate=0.0, attn_backend=backend).double()
    theirs = _authors_module().AuthorsBiXT(img_size=64, depth=3).double()
    theirs.load_state_dict(bixt_to_official(ours.state_dict()), strict=True)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-10, rtol=1e-10)
    (out_ours.square().sum()).backward()
    (out_theirs.square().sum()).backward()
    grads_theirs = dict(theirs.named_parameters())
    for name, p in bixt_to_official(dict(ours.named_parameters())).items():
        torch.testing.assert_close(p.grad, grads_theirs[name].grad, atol=1e-9, rtol=1e-8, msg=name)


def test_gemm_floor_counts_every_matrix_product_of_a_step_by_layout():
    """benchmarks/gemm_floor.py, the matmul floor of a step: a Linear's forward and backward are one addmm (its
    bias dropped: the product is x @ W^T, W^T a transposed view) and two mm (the input's and the weight's
    gradients); a batched product is a bmm; the replay times each distinct product."""
    floor = _authors_module("gemm_floor")
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 5, 7)

    def step():
        lin(x).sum().backward()
        torch.bmm(a, b)

    products = floor.record(step)
    assert sum(products.values()) == 4 and len(products) == 4
    assert ("aten::addmm", ((4, 8), (8, 1), torch.float32), ((8, 16), (1, 8), torch.float32)) in products
    assert {op for op, _, _ in products} == {"aten::addmm", "aten::mm", "aten::bmm"}
    assert ("aten::bmm", ((2, 3, 5), (15, 5, 1), torch.float32), ((2, 5, 7), (35, 7, 1), torch.float32)) in products
    assert floor.replay(products, repeats=1) > 0
