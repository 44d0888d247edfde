"""`bixt tune` and the per-machine crossover cache that `auto` reads (bixt.nn.autotune, bixt.measure.tune)."""
import functools
import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from bixt.measure import tune as t
from bixt.nn import autotune
from bixt.nn.attention import CPU_BF16_RULE, auto_bidirectional
from bixt.nn.fused import _AUTO_MIN_TOKENS, fused_wins
from bixt_cli.main import app

CPU = torch.device("cpu")
runner = CliRunner()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache directory of our own, the cache switched on (conftest switches it off for other tests)."""
    monkeypatch.setenv("BIXT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BIXT_NO_TUNE_CACHE", raising=False)
    autotune.clear()
    yield tmp_path
    autotune.clear()


def wins(tokens: int, training: bool) -> bool:
    return fused_wins(CPU, torch.float32, tokens, training)


def auto(batch: int, tokens: int, training: bool = True, dtype=torch.float32) -> str:
    return auto_bidirectional(CPU, dtype, batch, tokens, training) or "sdpa"


# Small and batched shapes on sdpa or math, long single samples on fused: a Xeon-like table.
TABLE = ((1, 256, "sdpa"), (32, 196, "math"), (1, 4096, "fused"), (1, 16384, "fused"))


def test_cache_round_trip(cache_dir):
    path = autotune.store({True: TABLE, False: TABLE[:1]}, "by hand")
    assert path == cache_dir / "tune.json" and [p.name for p in cache_dir.iterdir()] == ["tune.json"]
    entry = json.loads(path.read_text())["machines"][autotune.machine_key()]
    assert entry["choices"]["train"] == [list(c) for c in TABLE] and entry["how"] == "by hand"
    autotune.clear()
    assert autotune.lookup() == {True: TABLE, False: TABLE[:1]}


def test_cache_location_follows_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("BIXT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "bixt" / "tune.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert autotune.cache_path() == tmp_path / ".cache" / "bixt" / "tune.json"


def test_auto_takes_the_choice_of_the_nearest_measured_shape(cache_dir):
    autotune.store({True: TABLE, False: ((1, 256, "sdpa"),)}, "test")
    assert [auto(1, 256), auto(32, 196), auto(1, 4096), auto(1, 20000)] == ["sdpa", "math", "fused", "fused"]
    assert auto(64, 196) == "math"  # nearer 32 x 196 than 1 x 16,384: as many tokens, but per sample far fewer
    assert auto(1, 6272) == "fused"  # 32 x 196's token count in one sample: fused, as the long samples
    autotune.store({True: ((1, 2048, "sdpa"), (8, 196, "math")), False: ((1, 256, "sdpa"),)}, "test")
    assert auto(4, 576) == "math"  # a few short samples are nearer many short ones than one long one
    assert auto(1, 1 << 20, training=False) == "sdpa"
    assert auto(1, 1 << 20, dtype=torch.float64) == "fused"  # the table is float32's; float64 keeps the built-in
    assert auto(32, 196, dtype=torch.bfloat16) == "math" and auto(1, 4096, dtype=torch.bfloat16) == "math"  # bf16:
    # its own built-in rule, not float32's table


def test_bf16_has_its_own_entry_and_built_in_rule(cache_dir):
    rule = CPU_BF16_RULE
    bf16 = functools.partial(auto, dtype=torch.bfloat16)
    assert bf16(32, 196) == "math" and bf16(1, rule["train_math_below"] - 1) == "math"
    assert bf16(1, rule["train_math_below"]) == "fused"
    assert bf16(1, rule["infer_fused_from"], training=False) == "fused"
    assert bf16(rule["infer_math_from_batch"], 196, training=False) == "math"
    assert bf16(rule["infer_math_from_batch"] - 1, 1024, training=False) == "sdpa"
    autotune.store({True: TABLE, False: TABLE}, "float32")
    assert bf16(1, 4096) == "math"  # float32's entry is not bf16's
    path = autotune.store({True: ((1, 256, "fused"),), False: ((1, 256, "sdpa"),)}, "bf16", dtype=torch.bfloat16)
    machines = json.loads(path.read_text())["machines"]
    assert machines[autotune.machine_key(dtype=torch.bfloat16)]["dtype"] == "bfloat16"
    assert machines[autotune.machine_key()]["how"] == "float32"  # kept beside it
    assert bf16(32, 196) == "fused" and bf16(32, 196, training=False) == "sdpa" and auto(32, 196) == "math"
    assert t.current()["dtypes"]["bf16"]["source"] == "cache"


def test_one_way_auto_in_bf16_on_a_cpu_takes_math_over_few_keys(monkeypatch):
    """The latents' self-attention: math's result exactly below the rule's keys, sdpa's from there."""
    from bixt.nn import attention as att

    g = torch.Generator().manual_seed(0)
    few = [torch.randn(2, 2, 8, 16, generator=g).bfloat16() for _ in range(3)]
    assert torch.equal(att.attention(*few), att.attention(*few, backend="math"))
    monkeypatch.setitem(att.CPU_BF16_RULE, "one_way_math_below", 8)
    assert torch.equal(att.attention(*few), att.attention(*few, backend="sdpa"))
    assert torch.equal(att.attention(*(x.float() for x in few)), att.attention(*(x.float() for x in few),
                                                                               backend="sdpa"))


def test_a_tuned_auto_runs_the_chosen_backend(cache_dir):
    """The choice reaches the computation: math at a shape tuned to math gives math's result exactly."""
    from bixt.nn.attention import bidirectional_attention

    autotune.store({True: TABLE, False: ((1, 8, "math"),)}, "test")
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 2, L, 8, generator=g) for L in (4, 4, 8, 8)]
    with torch.inference_mode():
        expected = bidirectional_attention(*x, backend="math")
        got = bidirectional_attention(*x, backend="auto")
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_built_in_thresholds_without_an_entry_or_with_the_cache_switched_off(cache_dir, monkeypatch):
    least = _AUTO_MIN_TOKENS[True]
    assert auto(1, least) == "fused" and auto(1, least - 1) == "sdpa"
    autotune.store({True: TABLE, False: TABLE}, "test")
    assert auto(1, 256) == "sdpa" and auto(32, 196) == "math"
    monkeypatch.setenv("BIXT_NO_TUNE_CACHE", "1")
    assert auto(32, 196) == "fused" and auto(1, least - 1) == "sdpa"  # 6,272 tokens in the batch: built-in fused
    assert t.current()["dtypes"]["fp32"]["source"].startswith("built-in (BIXT_NO_TUNE_CACHE")


@pytest.mark.parametrize("text", [b"{not json", b'{"version": 2, "machines": []}', b"\xff\xfe\x00",
                                  b"MACHINE_BAD_CHOICE", b'{"version": 1, "machines": {}}'])
def test_a_corrupt_or_old_cache_warns_once_and_falls_back(cache_dir, text):
    if text == b"MACHINE_BAD_CHOICE":
        entry = {"choices": {"train": [[1, 256, "fastest"]], "infer": [[1, 256, "sdpa"]]}}
        text = json.dumps({"version": 2, "machines": {autotune.machine_key(): entry}}).encode()
    (cache_dir / "tune.json").write_bytes(text)
    least = _AUTO_MIN_TOKENS[True]
    with pytest.warns(RuntimeWarning, match=r"tune\.json.*bixt tune"):
        assert auto(1, least - 1) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per call
        assert auto(1, least) == "fused"
    autotune.store({True: TABLE, False: TABLE}, "rewritten")  # `bixt tune` replaces the file
    assert auto(32, 196) == "math"


def test_another_machines_entry_is_not_used_and_is_kept(cache_dir):
    other = {"choices": {"train": [[1, 1, "math"]], "infer": [[1, 1, "math"]]}}
    (cache_dir / "tune.json").write_text(json.dumps({"version": 2, "machines": {"another cpu | 64 threads": other}}))
    assert autotune.lookup() is None and auto(1, 256) == "sdpa"
    autotune.store({True: TABLE, False: TABLE}, "test")
    machines = json.loads((cache_dir / "tune.json").read_text())["machines"]
    assert machines["another cpu | 64 threads"] == other and autotune.machine_key() in machines


def test_the_machine_key_names_cpu_threads_torch_and_device():
    key = autotune.machine_key()
    assert autotune.cpu_model() in key and f"{torch.get_num_threads()} threads" in key and key.endswith("cpu")
    assert "torch " + ".".join(torch.__version__.split(".")[:2]) in key


def test_choices_and_the_check_report_auto_over_the_best_single_backend():
    table = {"train": [{"batch": 1, "tokens": 256, "batch_tokens": 256, "sdpa": 1.0, "math": 2.0, "fused": 3.0},
                       {"batch": 1, "tokens": 4096, "batch_tokens": 4096, "sdpa": 3.0, "math": 2.0, "fused": 1.0}],
             "infer": [{"batch": 32, "tokens": 196, "batch_tokens": 6272, "sdpa": 1.0, "math": 0.5, "fused": 2.0}]}
    chosen = t.choices(table)
    assert chosen == {True: ((1, 256, "sdpa"), (1, 4096, "fused")), False: ((32, 196, "math"),)}
    check = {"train": [{"batch": 1, "tokens": 512, "batch_tokens": 512, "sdpa": 1.0, "math": 1.5, "fused": 1.2}]}
    row = t.judged(check, chosen)["train"][0]
    assert row["chosen"] == "sdpa" and row["best"] == "sdpa" and row["auto_over_best"] == 1.0  # 512: nearer 256
    check["train"][0]["fused"] = 0.5
    assert t.judged(check, {True: ((1, 4096, "fused"),)})["train"][0]["auto_over_best"] == 1.0
    assert t.judged(check, {True: ((1, 256, "sdpa"),)})["train"][0]["auto_over_best"] == 2.0


def test_cli_tune_quick_no_cache_prints_the_tables_and_writes_out(cache_dir, tmp_path):
    out = tmp_path / "res" / "tune.json"
    result = runner.invoke(app, ["tune", "--quick", "--no-cache", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("sdpa ms", "math ms", "fused ms", "auto picks", "auto/best", "check, a second measurement",
                 "worst auto / best in the check", "not cached"):
        assert text in result.output, result.output
    assert not (cache_dir / "tune.json").exists()
    saved = json.loads(out.read_text())
    assert set(saved["rows"]) == {"train", "infer"} and len(saved["rows"]["train"]) == len(t.QUICK_LADDER)
    assert len(saved["check"]["infer"]) == len(t.QUICK_CHECK_LADDER) and saved["cache"] is None


def test_cli_tune_writes_the_cache_and_says_where(cache_dir, monkeypatch):
    monkeypatch.setattr(t, "QUICK_LADDER", ((1, 256),))
    result = runner.invoke(app, ["tune", "--quick", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "cached in" in result.output and "auto reads it on this machine" in result.output
    assert autotune.lookup() is not None


def test_cli_tune_show(cache_dir):
    result = runner.invoke(app, ["tune", "--show"])
    assert result.exit_code == 0, result.output
    assert "built-in (no entry for this machine)" in result.output and f"{_AUTO_MIN_TOKENS[True]:,}" in result.output
    assert f"{CPU_BF16_RULE['train_math_below']:,}" in result.output  # bf16's built-in rule, shown apart
    autotune.store({True: TABLE, False: TABLE[:1]}, "by hand")
    result = runner.invoke(app, ["tune", "--show"])
    assert "fp32: machine" in result.output and "source: cache" in result.output
    assert "32 x 196: math" in result.output and "by hand" in result.output and str(cache_dir) in result.output
    assert "bf16: machine" in result.output and result.output.count("source: cache") == 1


def test_cli_tune_refuses_bad_repeats_in_one_line():
    from conftest import assert_one_line_error

    assert_one_line_error(runner.invoke(app, ["tune", "--repeats", "0"]), "--repeats must be at least 1")
    assert_one_line_error(runner.invoke(app, ["tune", "--dtype", "fp16"]), "--dtype 'fp16' is not one auto is tuned")


def test_cli_tune_bf16_refused_in_one_line_without_cpu_support(monkeypatch):
    from conftest import assert_one_line_error

    monkeypatch.setattr("bixt.nn.precision.cpu_supports_bf16", lambda: False)
    assert_one_line_error(runner.invoke(app, ["tune", "--dtype", "bf16"]), "--dtype bf16 needs a CPU with bf16")


@pytest.mark.skipif(not __import__("bixt.nn.precision", fromlist=["x"]).cpu_supports_bf16(),
                    reason="this CPU has no native bf16")
def test_cli_tune_bf16_caches_its_own_entry(cache_dir, monkeypatch):
    monkeypatch.setattr(t, "QUICK_LADDER", ((1, 256),))
    monkeypatch.setattr(t, "QUICK_CHECK_LADDER", ())
    result = runner.invoke(app, ["tune", "--quick", "--repeats", "1", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert autotune.lookup(dtype=torch.bfloat16) is not None and autotune.lookup() is None
    assert "bfloat16" in autotune.entry_info(dtype=torch.bfloat16)["how"]
