"""Faults at the command line and in the files it reads and writes: rich markup in user text, a full or read-only
disk, out of memory, mistyped model args, empty / truncated / foreign checkpoints, usage errors. Each ends as one
line on stderr with exit code 2 (or, for OOM inside a measurement, as a recorded status), never a traceback.
Faults the machine would have to provide (a full disk, OOM) are injected by monkeypatching."""
import errno
import io
import os
import pickle
import re
import shlex

import pytest
import torch
import typer
from conftest import assert_one_line_error, tiny_config
from rich.console import Console
from typer.testing import CliRunner

from bixt import BiXT
from bixt.io import atomic
from bixt.io.checkpoint import load_checkpoint, read_state_dict, save_weights
from bixt.measure import compare as cmp
from bixt.measure import profile as prof
from bixt.models.registry import model_config
from bixt_cli.app import user_errors
from bixt_cli.main import app

runner = CliRunner()
PLAN = prof.Plan(warmup_s=0.0, min_iters=1, max_iters=1, target_s=0.0)
CUDA_OOM = "CUDA out of memory. Tried to allocate 400.00 GiB.\nGPU 0 has a total capacity of 79 GiB"


def one_line_on_stderr(result, message: str) -> None:
    """The contract where a command printed progress on stdout before failing: stderr holds the one line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def no_temp_files(root) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------
# 1. User text is printed literally, never read as rich markup.


@pytest.mark.parametrize("args,message", [
    (["models", "--filter", "[/b]"], "no model matches '[/b]'"),
    (["models", "--family", "[/x]y"], "unknown family '[/x]y'"),
    (["eval", "--checkpoint", "{tmp}/[/x]w.safetensors"], "[/x]w.safetensors does not exist"),
    (["profile", "-m", "[bold]x[/bold]"], "unknown model '[bold]x[/bold]'"),
])
def test_markup_in_user_text_is_printed_literally(args, message, tmp_path):
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(result, message)


def test_bracketed_parts_of_messages_are_kept(tmp_path):
    """`bixt eval`'s mismatch message lists the keys in brackets: rich used to swallow them (`shape mismatches ;`)."""
    weights = save_weights(BiXT(tiny_config()), tmp_path / "w.safetensors")
    result = runner.invoke(app, ["eval", "--checkpoint", str(weights), "--model", "bixt_digits", "--data", "digits"])
    assert_one_line_error(result, "checkpoint does not fit this model")
    assert "shape mismatches [" in result.output and "missing keys [layers." in result.output, result.output


def test_tables_print_messages_literally():
    from bixt_cli.measure import _table

    out = io.StringIO()
    Console(file=out, width=200).print(_table("[/t] title", [{"model": "m", "message": "infer: [/x] boom"}],
                                              ["model", "message"]))
    assert "[/x] boom" in out.getvalue() and "[/t] title" in out.getvalue()


@pytest.fixture
def fake_sweep(monkeypatch):
    """bixt compare's real sweep with cheap fakes for the fresh processes and the counts."""
    run_sweep = cmp.run_sweep
    monkeypatch.setattr(cmp, "run_sweep", lambda sweep, out, **kw: run_sweep(sweep, out, runner=ok_runner,
                                                                             counter=oom_free_count, **kw))


def test_compare_out_with_markup_and_a_full_disk(tmp_path, monkeypatch, fake_sweep):
    """The header names --out (markup in it printed as is); a full disk at the first results file is one line on
    stderr naming the file, and no temporary file is left."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    out = tmp_path / "[/x]sweep"
    result = runner.invoke(app, ["compare", "--seq-lens", "16", "--baselines", "vit", "--quick", "--out", str(out)])
    one_line_on_stderr(result, f"no space left on device while writing {out / 'results.json'}: free space or "
                               "choose another --out")
    assert "[/x]sweep" in result.stdout
    assert no_temp_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# 2. Errors the handler reports: full and read-only disks, OOM, corrupt weights; bugs keep their traceback.


def ok_runner(setup, mode, plan, timeout):
    return {"status": "ok", "message": "", "step_ms": 1.0, "samples_per_sec": 1000.0, "peak_mem_mib": 1.0}


def oom_free_count(prep):
    return {"gmacs": 0.001, "gmacs_executed": 0.001, "macs_backend": prep.count_backend, "unsupported_ops": {}}


def _handled(fn, capsys) -> str:
    with pytest.raises(typer.Exit) as exit_:
        user_errors(fn)()
    assert exit_.value.exit_code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def _raise(exc):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("exc,message", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/w.safetensors"),
     "no space left on device while writing /data/run/w.safetensors: free space or choose another --out"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device while writing the output"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/results.json"),
     "read-only file system: cannot write /ro/results.json: choose a writable --out"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "permission denied: /root/x"),
    (MemoryError(), "out of memory: reduce --batch-size / --seq-len"),
    (torch.OutOfMemoryError(CUDA_OOM), "out of memory (CUDA out of memory. Tried to allocate 400.00 GiB.): reduce"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "out of memory"),
    (IsADirectoryError("checkpoint x is a folder"), "checkpoint x is a folder"),
])
def test_handler_turns_machine_faults_into_one_line(exc, message, capsys):
    assert message in _handled(_raise(exc), capsys)


def test_handler_reports_a_corrupt_weights_file(capsys):
    from safetensors import SafetensorError

    err = _handled(_raise(SafetensorError("Error while deserializing header: header too small")), capsys)
    assert "unreadable weights file (Error while deserializing header: header too small)" in err


@pytest.mark.parametrize("exc", [TypeError("bug"), IndexError("bug"), KeyError("bug"), RuntimeError("a bug"),
                                 OSError(errno.EIO, "I/O error")])
def test_handler_lets_bugs_keep_their_traceback(exc):
    with pytest.raises(type(exc)):
        user_errors(_raise(exc))()
    with pytest.raises(typer.Exit) as exit_:  # a command's own exit passes through untouched
        user_errors(_raise(typer.Exit(1)))()
    assert exit_.value.exit_code == 1


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_full_disk_while_saving_weights_names_the_file_and_leaves_nothing(error, tmp_path, monkeypatch, capsys):
    """safetensors writes through its own error type (os error 28 in the text); either way: one line naming the
    file, the earlier file intact, no temporary file."""
    from safetensors import SafetensorError

    path = save_weights(BiXT(tiny_config()), tmp_path / "w.safetensors")
    before = path.read_bytes()

    def full(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    err = _handled(lambda: save_weights(BiXT(tiny_config()), path), capsys)
    assert f"no space left on device while writing {path}" in err
    assert path.read_bytes() == before and no_temp_files(tmp_path) == []


def test_atomic_write_names_the_target_not_the_temporary_file(tmp_path, monkeypatch):
    def readonly(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".x.json.abc.tmp"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", readonly)
    with pytest.raises(OSError) as e:
        atomic.atomic_write(tmp_path / "x.json", b"{}")
    assert e.value.errno == errno.EROFS and e.value.filename == str(tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


def test_compare_on_a_read_only_folder_is_one_line(tmp_path, monkeypatch, fake_sweep):

    def readonly(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", readonly)
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["compare", "--seq-lens", "16", "--baselines", "vit", "--quick", "--out", str(out)])
    one_line_on_stderr(result, f"read-only file system: cannot write {out / 'results.json'}")
    # The folder check itself: a folder the process may not write to is refused before anything runs.
    monkeypatch.setattr(cmp.os, "access", lambda *a: False)
    result = runner.invoke(app, ["compare", "--seq-lens", "16", "--out", str(tmp_path / "ro" / "sweep")])
    assert_one_line_error(result, "not a writable folder")


@pytest.mark.parametrize("exc,message", [(MemoryError(), "out of memory: reduce --batch-size / --seq-len"),
                                         (torch.OutOfMemoryError(CUDA_OOM), "out of memory (CUDA out of memory.")])
def test_out_of_memory_in_a_command_is_one_line(exc, message, monkeypatch):
    monkeypatch.setattr(prof, "profile", _raise_any(exc))
    assert_one_line_error(runner.invoke(app, ["profile", "-m", "bixt_digits"]), message)


def _raise_any(exc):
    def fn(*args, **kwargs):
        raise exc
    return fn


# ---------------------------------------------------------------------------------------------------------------
# 2a. Model args of the wrong type are refused where the config is made.


@pytest.mark.parametrize("arg,message", [
    ("depth=abc", "model arg depth must be an integer, got 'abc'"),
    ("depth=[1,2]", "model arg depth must be an integer, got [1, 2]"),
    ("depth=true", "model arg depth must be an integer, got True"),
    ("depth=2.5", "model arg depth must be an integer, got 2.5"),
    ("mlp_ratio=wide", "model arg mlp_ratio must be a number, got 'wide'"),
    ("qkv_bias=3", "model arg qkv_bias must be true or false, got 3"),
    ("attn_backend=3", "model arg attn_backend must be a string, got 3"),
    ("token_dim=x", "model arg token_dim must be an integer, got 'x'"),
    ("stride=0", "stride must be positive, got 0"),
    ("cross_heads=0", "cross_heads must be positive, got 0"),
    ("in_chans=-1", "in_chans must be >= 0, got -1"),
])
def test_mistyped_model_args_are_one_line(arg, message):
    assert_one_line_error(runner.invoke(app, ["profile", "-m", "bixt_digits", "--model-arg", arg]), message)


def test_family_configs_check_their_types_too():
    import numpy as np

    for name, changes, message in [("vit_ti_p16", {"depth": "abc"}, "model arg depth must be an integer"),
                                   ("perceiver_ti", {"num_blocks": "x"}, "model arg num_blocks must be an integer"),
                                   ("perceiver_ti", {"share_cross": "yes"}, "share_cross must be true or false"),
                                   ("bixt_ti_l64_p16", {"layerscale": "tiny"}, "layerscale must be a number")]:
        with pytest.raises(ValueError, match=message):
            model_config(name, **changes)
    # What YAML leaves a string ("1e-5") is read as the float the field declares; numpy's integers are integers.
    assert model_config("bixt_ti_l64_p16", layerscale="1e-5").layerscale == 1e-5
    assert model_config("bixt_digits", num_classes=np.int64(7)).num_classes == 7
    assert model_config("bixt_ti_l64_p16", layerscale=None).layerscale is None


# ---------------------------------------------------------------------------------------------------------------
# 2b / 5. Checkpoints: empty, truncated, foreign, folders, pickle exploits.


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _bad_files(tmp):
    good = tmp / "good.pt"
    torch.save(BiXT(tiny_config()).state_dict(), good)
    legacy = tmp / "legacy.pt"
    torch.save(BiXT(tiny_config()).state_dict(), legacy, _use_new_zipfile_serialization=False)
    files = {"empty.pt": b"", "empty.pth.tar": b"", "empty.safetensors": b"", "text.pt": b"hello world\n",
             "random.pth": bytes(range(256)) * 3, "truncated.pt": good.read_bytes()[:200],
             "truncated-legacy.pt": legacy.read_bytes()[:50],
             "truncated-legacy2.pt": legacy.read_bytes()[: len(legacy.read_bytes()) // 2],
             "exploit.pt": pickle.dumps({"w": Exploit(tmp / "pwned")}),
             "exploit-v2.pt": pickle.dumps({"w": Exploit(tmp / "pwned")}, protocol=2)}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return list(files)


@pytest.mark.parametrize("name,message", [
    ("empty.pt", "is empty (0 bytes)"), ("empty.pth.tar", "is empty (0 bytes)"),
    ("empty.safetensors", "is empty (0 bytes)"), ("text.pt", "not a readable PyTorch checkpoint"),
    ("random.pth", "not a readable PyTorch checkpoint"), ("truncated.pt", "not a readable PyTorch checkpoint"),
    ("truncated-legacy.pt", "not a readable PyTorch checkpoint"),
    ("truncated-legacy2.pt", "not a readable PyTorch checkpoint"),
    ("exploit.pt", "not a readable PyTorch checkpoint"), ("exploit-v2.pt", "refused, not unpickled"),
])
def test_bad_checkpoint_files_are_one_line_value_errors(name, message, tmp_path):
    _bad_files(tmp_path)
    path = tmp_path / name
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        read_state_dict(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_checkpoint(BiXT(tiny_config()), path)
    result = runner.invoke(app, ["eval", "--checkpoint", str(path)])
    assert_one_line_error(result, message)
    assert not (tmp_path / "pwned").exists(), "the exploit ran"


def test_checkpoint_folders_and_missing_files(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder: give a weights file"):
        read_state_dict(tmp_path)
    assert_one_line_error(runner.invoke(app, ["eval", "--checkpoint", str(tmp_path)]), "holds no best.safetensors")
    assert_one_line_error(runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "none.pt")]), "does not exist")


# ---------------------------------------------------------------------------------------------------------------
# 3. Out of memory while measuring is a status.


def _sweep():
    return cmp.Sweep(("bixt_ti_l64_p16",), (16,), modes=("infer", "train"), plan=PLAN, budget_s=100.0)


def test_sweep_records_an_oom_in_the_count():
    def oom(prep):
        raise torch.OutOfMemoryError(CUDA_OOM)

    row = cmp.run_config(_sweep(), "bixt_ti_l64_p16", 16, cmp.StepModel(), ok_runner, oom, 100.0)
    assert row["status"] == "oom" and row["message"] == ("count: OutOfMemoryError: CUDA out of memory. Tried to "
                                                         "allocate 400.00 GiB.")  # the first line only
    assert row["infer_status"] == row["train_status"] == "not run"


@pytest.mark.parametrize("runner_kind", ["returns", "raises"])
def test_sweep_records_an_oom_in_a_mode(runner_kind):
    def oom_runner(setup, mode, plan, timeout):
        if mode == "infer":
            return ok_runner(setup, mode, plan, timeout)
        if runner_kind == "raises":
            raise torch.OutOfMemoryError(CUDA_OOM)
        return {"status": "oom", "message": "train: killed by SIGKILL (out of memory)"}

    row = cmp.run_config(_sweep(), "bixt_ti_l64_p16", 16, cmp.StepModel(), oom_runner, oom_free_count, 100.0)
    assert row["status"] == "oom" and row["infer_status"] == "ok" and row["train_status"] == "oom"
    assert row["message"].startswith("train: ") and "\n" not in row["message"]


def test_worker_reports_cuda_oom_as_a_status(monkeypatch):
    monkeypatch.setattr(prof, "run_mode", _raise_any(torch.OutOfMemoryError(CUDA_OOM)))
    payload = {"setup": {**prof.Setup("bixt_ti_l64_p16", 16).__dict__, "overrides": []}, "mode": "train",
               "plan": PLAN.__dict__}
    result = prof._worker(payload)
    assert result["status"] == "oom" and result["message"].startswith("train: OutOfMemoryError: CUDA out of memory")


def test_profile_reports_an_oom_in_its_count_as_a_status(monkeypatch):
    """The count runs in `bixt profile`'s own process: its OOM is a status, and the modes still run (each in a
    fresh process, faked here)."""
    monkeypatch.setattr(prof, "count", _raise_any(torch.OutOfMemoryError(CUDA_OOM)))
    monkeypatch.setattr(prof, "measure", lambda setup, mode, plan, timeout: prof.failure("oom", f"{mode}: oom"))
    result = runner.invoke(app, ["profile", "-m", "bixt_digits", "--mode", "infer", "--json"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.stdout)
    assert report["count_status"] == "oom" and report["count_message"].startswith("count: OutOfMemoryError")
    assert report["gmacs"] is None and report["gmacs_analytic"] > 0 and report["infer_status"] == "oom"
    table = runner.invoke(app, ["profile", "-m", "bixt_digits", "--mode", "infer"])
    assert table.exit_code == 0 and "count_status" in table.output and "out of memory" in table.output.lower()


# ---------------------------------------------------------------------------------------------------------------
# 4. Usage errors (click's) are one line when stderr is not a terminal.


@pytest.mark.parametrize("args,message", [
    (["models", "--bogus"], "No such option: --bogus (try `bixt models --help`)"),
    (["fly"], "No such command 'fly'."),
    (["profile", "-m", "bixt_digits", "--seq-len", "abc"], "Invalid value for '--seq-len'"),
    (["profile"], "Missing option '--model'"),
])
def test_usage_errors_are_one_line(args, message):
    result = runner.invoke(app, args)
    assert_one_line_error(result, message)
    assert result.output.startswith("error: ") and "--help" in result.output


def test_version_and_bare_command():
    from bixt import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"bixt {__version__}", result.output
    result = runner.invoke(app, [])
    assert result.exit_code == 2 and "Usage" in result.output and "error" not in result.output


# ---------------------------------------------------------------------------------------------------------------
# 5. Option values that used to end in a traceback, or ran anyway.


@pytest.mark.parametrize("args,message", [
    (["profile", "-m", "bixt_digits", "--seq-len", "-5"], "--seq-len must be positive, got -5"),
    (["profile", "-m", "bixt_ti_l64_p16", "--seq-len", str(2 ** 62)], "far beyond any machine's memory"),
    (["profile", "-m", "bixt_ti_l64_p16", "--seq-len", str(2 ** 40)], "GiB for the input alone"),
    (["profile", "-m", "bixt_ti_l64_p16", "--img-size", str(2 ** 40)], "far beyond any machine's memory"),
    (["profile", "-m", "bixt_digits", "--batch-size", "0"], "--batch-size must be positive"),
    (["profile", "-m", "bixt_digits", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["profile", "-m", "bixt_digits", "--device", "tpu"], "unknown device 'tpu'"),
    (["compare", "--seq-lens", "16,-5"], "--seq-lens must be positive, got -5"),
    (["compare", "--seq-lens", str(2 ** 62)], "far beyond any machine's memory"),
    (["compare", "--seq-lens", "16", "--budget-s", "nan"], "--budget-s must be positive and finite, got nan"),
    (["compare", "--seq-lens", "16", "--budget-s", "inf"], "--budget-s must be positive and finite, got inf"),
])
def test_bad_option_values_are_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.setattr(cmp, "run_sweep", _raise_any(AssertionError("the sweep ran")))
    out = ["--out", str(tmp_path / "sweep")] if args[0] == "compare" else []
    assert_one_line_error(runner.invoke(app, [*args, *out]), message)
    assert not (tmp_path / "sweep").exists()
