"""Byte sequences: the ListOps generator, the listops and textfolder data sets, padding passed as a mask, and
training / evaluating a sequence model from the CLI."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bixt import create_model
from bixt.data import PAD_ID, DataSpec, build_data, parse_spec
from bixt.data.listops import MIN_LENGTH, make_expression, solve
from bixt.train.engine import predict
from bixt_cli.main import app

runner = CliRunner()


@pytest.mark.parametrize("depth, length", [(1, MIN_LENGTH), (2, 40), (4, 512), (8, 2000)])
def test_listops_expressions_fit_and_evaluate_to_their_label(depth, length):
    for i in range(200):
        text, value = make_expression(np.random.default_rng([depth, i]), depth, length)
        assert len(text) <= length and text.startswith("[") and text.endswith(" ]")
        assert _nesting(text) <= depth
        assert solve(text) == value and 0 <= value <= 9
    assert make_expression(np.random.default_rng(3), 4, 300) == make_expression(np.random.default_rng(3), 4, 300)


def _nesting(text: str) -> int:
    level = deepest = 0
    for ch in text:
        level += (ch == "[") - (ch == "]")
        deepest = max(deepest, level)
    return deepest


def test_listops_operators_by_hand():
    assert solve("[MAX 2 9 [MIN 4 7 ] 0 ]") == 9
    assert solve("[MED 3 1 8 6 ]") == 3  # the lower median of 1 3 6 8
    assert solve("[SM 7 8 [MAX 1 2 ] ]") == 7  # (7 + 8 + 2) mod 10
    with pytest.raises(ValueError, match="max_length >= 10"):
        make_expression(np.random.default_rng(0), 3, 9)


def test_listops_spec_and_data():
    assert parse_spec("listops:length=64,train=5") == DataSpec("listops", options={"length": 64, "train": 5})
    for bad, message in [("listops:length=9", "length >= 10"), ("listops:depth=0", "depth >= 1"),
                         ("listops:size=3", "listops has no option 'size', use listops:length=N,train=N"),
                         ("listops:train=0", "train >= 1")]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)
    data = build_data("listops:length=64,train=40,test=20,depth=3")
    assert (data.modality, data.num_classes, data.in_chans, data.vocab_size, data.pad_id) == ("sequence", 10, 0,
                                                                                             256, PAD_ID)
    x, y = data.train.__getitems__(list(range(40)))
    assert x.shape == (40, 64) and x.dtype == torch.int64 and int(y.max()) <= 9
    for row, label in zip(x, y, strict=True):  # each row is an expression then padding, and its label is right
        text = bytes(row[row != PAD_ID].tolist()).decode("ascii")
        assert solve(text) == label and (row[len(text):] == PAD_ID).all()
    again = build_data("listops:length=64,train=40,test=20,depth=3", seed=5)  # the seed is the training's
    assert torch.equal(again.test.x, data.test.x) and not torch.equal(data.train.x[:20], data.test.x)
    assert build_data("listops:length=64,test=7", need_train=False).train is None


def write_corpus(root, held_out="test"):
    texts = {"train": {"pos": [b"good fun", b"great film " * 20], "neg": [b"bad", b"awful plot"]},
             held_out: {"pos": [b"fine"], "neg": [b"dull \x00 film"]}}
    for split, classes in texts.items():
        for name, docs in classes.items():
            (root / split / name).mkdir(parents=True)
            for i, doc in enumerate(docs):
                (root / split / name / f"{i}.txt").write_bytes(doc)


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_textfolder_reads_bytes_cut_and_padded(tmp_path, held_out):
    write_corpus(tmp_path, held_out)
    data = build_data(f"textfolder:{tmp_path}", seq_len=16)
    assert data.classes == ["neg", "pos"] and data.num_classes == 2 and len(data.train) == 4 and len(data.test) == 2
    x, y = data.train.__getitems__([0, 1, 2, 3])
    assert x.shape == (4, 16) and y.tolist() == [0, 0, 1, 1]
    assert bytes(x[3].tolist()) == (b"great film " * 2)[:16]  # cut to the model's length
    assert bytes(x[0].tolist()) == b"bad" + bytes(13)  # padded with byte 0


def test_textfolder_errors(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "train" / "pos" / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        build_data(f"textfolder:{tmp_path}")
    (tmp_path / "train" / "pos" / "empty.txt").unlink()
    (tmp_path / "train" / "other").mkdir()
    with pytest.raises(ValueError, match="different class folders"):
        build_data(f"textfolder:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="expected a folder with train/<class>/ and test or val"):
        build_data(f"textfolder:{tmp_path / 'nowhere'}")


@pytest.mark.parametrize("name, args", [
    ("bixt_bytes", {"dim": 32, "depth": 2}),
    ("vit_ti_text", {"dim": 32, "depth": 2, "heads": 2}),
    ("perceiver_ti_text", {"dim": 32, "num_latents": 8, "num_blocks": 1, "self_per_block": 1, "heads": 2}),
])
def test_padding_is_masked_so_more_of_it_changes_nothing(name, args):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **args).eval()
    for n, p in model.named_parameters():
        if n.startswith("head"):  # zero-initialised: every input would give the same logits
            torch.nn.init.normal_(p)
    x = torch.randint(1, 256, (3, 20))
    x[1, 12:] = PAD_ID
    longer = torch.cat([x, torch.full((3, 9), PAD_ID)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(predict(model, longer, PAD_ID), predict(model, x, PAD_ID), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(longer), model(x), atol=1e-3)  # unmasked, padding would count


def test_cli_trains_and_evaluates_a_text_folder(tmp_path):
    write_corpus(tmp_path / "corpus")
    run, cfg = tmp_path / "run", tmp_path / "small.yaml"
    cfg.write_text("model_args: {dim: 32, depth: 1, seq_len: 64}\n")
    args = ["train", "--data", f"textfolder:{tmp_path / 'corpus'}", "--model", "bixt_bytes", "--epochs", "2",
            "--batch-size", "2", "--out", str(run), "--config", str(cfg)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["model"] == "bixt_bytes" and got["samples"] == 2 and 0 <= got["top1"] <= 1
