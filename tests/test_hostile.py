"""Hostile input at every command: the contract, case by case.

Every case must end with exit code 2 and ONE line naming the problem, no traceback, no injected code run and no
file left half-written (no temporary files, no run folder holding a partial run). The table covers types, ranges,
non-finite numbers, rich markup, huge sizes, empty / corrupt / truncated / foreign files, pickle and YAML
exploits, and busy, occupied, read-only and full output folders. Faults that need the machine's help (a full disk,
out of memory) are injected by monkeypatching.
"""
import errno
import os
import pickle
import shlex
import struct
import zlib
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, tiny_config
from test_faults_train import HOLD_LOCK
from typer.testing import CliRunner

from bixt import BiXT, save_weights
from bixt_cli.main import app

runner = CliRunner()
TINY = ["--data", "shapes:points=32,train=32,test=16", "--epochs", "1", "--batch-size", "16",
        "--model-arg", "depth=1", "--model-arg", "dim=32", "--model-arg", "num_latents=8", "--model-arg", "heads=2"]


class Exploit:
    """Unpickling this runs `touch MARKER`: a loader that runs it has lost the game."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _png(path: Path, side: int = 8) -> Path:
    raw = b"".join(b"\x00" + bytes(3 * side) for _ in range(side))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _image_folder(root: Path, bad: str | None = None) -> Path:
    """train/ and val/ with two classes of good 8x8 PNGs; `bad` adds one broken file or an empty class."""
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                _png(root / split / cls / f"{i}.png")
    target = root / "train" / "cat"
    if bad == "empty_class":
        (root / "train" / "eel").mkdir()
        (root / "val" / "eel").mkdir()
    elif bad == "zero_bytes":
        (target / "zero.png").write_bytes(b"")
    elif bad == "text_as_png":
        (target / "note.png").write_text("not an image")
    elif bad == "truncated":
        data = _png(target / "t.png").read_bytes()
        (target / "t.png").write_bytes(data[: len(data) // 2])
    return root


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _weights(tmp: Path) -> Path:
    return save_weights(BiXT(tiny_config()).state_dict(), tmp / "w.safetensors")


def _run_folder_without_state(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data: digits\n")
    return run


def _run_folder_with(tmp: Path, content: bytes) -> Path:
    run = _run_folder_without_state(tmp)
    (run / "last.state.pt").write_bytes(content)
    return run


def _config(tmp: Path, text: str) -> Path:
    path = tmp / "c.yaml"
    path.write_text(text)
    return path


def _pickle_file(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.write_bytes(pickle.dumps({"state_dict": Exploit(tmp / "pwned")}))
    return path


def _occupied_out(tmp: Path) -> Path:
    out = tmp / "used"
    out.mkdir()
    (out / "something.txt").write_text("the user's file")
    return out


def _locked_out(tmp: Path) -> Path:
    """A run folder whose lock another process holds (a child that sleeps while holding it)."""
    import subprocess
    import sys
    import time

    out = tmp / "busy"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "locked"
    _locked_out.children.append(proc)
    time.sleep(0.1)
    return out


_locked_out.children = []


# (id, args with {tmp} placeholders, setup(tmp) -> {name: path} for more placeholders, a word the line must hold)
CASES = [
    # --- bixt train: data specs
    ("data-huge-points", ["train", *TINY, "--data", "shapes:points=999999999999"], None, "points"),
    ("data-negative-points", ["train", *TINY, "--data", "shapes:points=-5"], None, "points"),
    ("data-text-points", ["train", *TINY, "--data", "shapes:points=abc"], None, "points"),
    ("data-float-points", ["train", *TINY, "--data", "shapes:points=3.5"], None, "points"),
    ("data-repeated-key", ["train", *TINY, "--data", "shapes:points=64,points=128"], None, "points"),
    ("data-unknown-key", ["train", *TINY, "--data", "shapes:colour=3"], None, "colour"),
    ("data-unknown-kind", ["train", *TINY, "--data", "nosuchkind"], None, "nosuchkind"),
    ("data-huge-train", ["train", *TINY, "--data", "shapes:points=32,train=99999999999999"], None, "train"),
    ("data-missing-folder", ["train", *TINY, "--data", "imagefolder:{tmp}/nowhere"], None, "nowhere"),
    ("data-folder-is-file", ["train", *TINY, "--data", "imagefolder:{file}"],
     lambda t: {"file": _config(t, "x")}, "c.yaml"),
    ("data-markup-path", ["train", *TINY, "--data", "imagefolder:{tmp}/[/bold]x"], None, "[/bold]x"),
    ("data-empty-class", ["train", *TINY, "--data", "imagefolder:{root}"],
     lambda t: {"root": _image_folder(t / "img", "empty_class")}, "eel"),
    ("data-zero-byte-image", ["train", *TINY, "--data", "imagefolder:{root}"],
     lambda t: {"root": _image_folder(t / "img", "zero_bytes")}, "zero.png"),
    ("data-text-named-png", ["train", *TINY, "--data", "imagefolder:{root}"],
     lambda t: {"root": _image_folder(t / "img", "text_as_png")}, "note.png"),
    ("data-truncated-png", ["train", *TINY, "--data", "imagefolder:{root}"],
     lambda t: {"root": _image_folder(t / "img", "truncated")}, "t.png"),
    ("data-cifar-missing", ["train", *TINY, "--data", "cifar10:{tmp}/nocifar"], None, "nocifar"),
    ("data-modelnet-empty", ["train", *TINY, "--data", "modelnet40:{tmp}"], None, "modelnet40"),
    # --- bixt train: hyper-parameters
    ("lr-inf", ["train", *TINY, "--lr", "inf"], None, "lr"),
    ("lr-nan", ["train", *TINY, "--lr", "nan"], None, "lr"),
    ("lr-negative", ["train", *TINY, "--lr", "-1"], None, "lr"),
    ("lr-zero", ["train", *TINY, "--lr", "0"], None, "lr"),
    ("weight-decay-inf", ["train", *TINY, "--weight-decay", "inf"], None, "weight"),
    ("weight-decay-negative", ["train", *TINY, "--weight-decay", "-1"], None, "weight"),
    ("warmup-nan", ["train", *TINY, "--warmup-epochs", "nan"], None, "warmup"),
    ("epochs-zero", ["train", *TINY, "--epochs", "0"], None, "epochs"),
    ("epochs-negative", ["train", *TINY, "--epochs", "-3"], None, "epochs"),
    ("batch-zero", ["train", *TINY, "--batch-size", "0"], None, "batch"),
    ("seed-negative", ["train", *TINY, "--seed", "-1"], None, "seed"),
    ("model-arg-text-depth", ["train", *TINY, "--model-arg", "depth=abc"], None, "depth"),
    ("model-arg-negative-depth", ["train", *TINY, "--model-arg", "depth=-2"], None, "depth"),
    ("model-arg-unknown", ["train", *TINY, "--model-arg", "wings=3"], None, "wings"),
    ("model-arg-no-equals", ["train", *TINY, "--model-arg", "depth"], None, "KEY=VALUE"),
    ("model-arg-list", ["train", *TINY, "--model-arg", "depth=[1,2]"], None, "depth"),
    ("model-unknown", ["train", *TINY, "--model", "bixt_nope"], None, "bixt_nope"),
    ("device-tpu", ["train", *TINY, "--device", "tpu"], None, "tpu"),
    # --- bixt train: config files
    ("config-missing", ["train", "--config", "{tmp}/none.yaml"], None, "none.yaml"),
    ("config-yaml-exploit", ["train", "--config", "{cfg}"],
     lambda t: {"cfg": _config(t, f"lr: !!python/object/apply:os.system ['touch {t}/pwned']\n")}, "c.yaml"),
    ("config-lr-inf", ["train", *TINY, "--config", "{cfg}"], lambda t: {"cfg": _config(t, "lr: .inf\n")}, "lr"),
    ("config-model-args-text", ["train", "--config", "{cfg}"],
     lambda t: {"cfg": _config(t, "data: 'shapes:points=32,train=32,test=16'\nmodel_args: {depth: abc}\n")},
     "depth"),
    ("config-unknown-key", ["train", "--config", "{cfg}"], lambda t: {"cfg": _config(t, "learning_rate: 1\n")},
     "learning_rate"),
    ("config-not-a-mapping", ["train", "--config", "{cfg}"], lambda t: {"cfg": _config(t, "- 1\n- 2\n")}, "c.yaml"),
    ("config-binary", ["train", "--config", "{cfg}"],
     lambda t: {"cfg": _write(t / "c.yaml", b"\x00\xff\xfe\x01")}, "c.yaml"),
    # --- bixt train: resume and output folders
    ("resume-missing", ["train", "--resume", "{tmp}/norun"], None, "norun"),
    ("resume-no-state", ["train", "--resume", "{run}"], lambda t: {"run": _run_folder_without_state(t)},
     "last.state.pt"),
    ("resume-zero-byte-state", ["train", "--resume", "{run}"], lambda t: {"run": _run_folder_with(t, b"")},
     "last.state.pt"),
    ("resume-garbage-state", ["train", "--resume", "{run}"],
     lambda t: {"run": _run_folder_with(t, b"PK\x03\x04garbage")}, "last.state.pt"),
    ("resume-exploit-state", ["train", "--resume", "{run}"],
     lambda t: {"run": _run_folder_with(t, pickle.dumps(Exploit(t / "pwned")))}, "last.state.pt"),
    ("out-is-file", ["train", *TINY, "--out", "{file}"], lambda t: {"file": _config(t, "x")}, "c.yaml"),
    ("out-occupied", ["train", *TINY, "--out", "{out}"], lambda t: {"out": _occupied_out(t)}, "used"),
    ("out-busy", ["train", *TINY, "--out", "{out}"], lambda t: {"out": _locked_out(t)}, "busy"),
    # --- bixt eval
    ("eval-missing", ["eval", "--checkpoint", "{tmp}/none.safetensors"], None, "none.safetensors"),
    ("eval-zero-byte-safetensors", ["eval", "--checkpoint", "{w}"],
     lambda t: {"w": _write(t / "w.safetensors", b"")}, "w.safetensors"),
    ("eval-truncated-safetensors", ["eval", "--checkpoint", "{w}"],
     lambda t: {"w": (lambda p: _write(p, p.read_bytes()[:100]))(_weights(t))}, "w.safetensors"),
    ("eval-pickle-exploit", ["eval", "--checkpoint", "{w}", "--model", "bixt_digits", "--data", "digits"],
     lambda t: {"w": _pickle_file(t, "evil.pt")}, "evil.pt"),
    ("eval-text-as-pt", ["eval", "--checkpoint", "{w}", "--model", "bixt_digits"],
     lambda t: {"w": _write(t / "w.pt", b"hello")}, "w.pt"),
    ("eval-empty-dir", ["eval", "--checkpoint", "{tmp}"], None, "safetensors"),
    ("eval-wrong-model", ["eval", "--checkpoint", "{w}", "--model", "bixt_ti_l64_p16", "--data", "digits"],
     lambda t: {"w": _weights(t)}, "bixt_ti_l64_p16"),
    ("eval-bad-data", ["eval", "--checkpoint", "{w}", "--model", "bixt_digits", "--data", "nosuchkind"],
     lambda t: {"w": _weights(t)}, "nosuchkind"),
    ("eval-batch-zero", ["eval", "--checkpoint", "{w}", "--batch-size", "0"], lambda t: {"w": _weights(t)}, "batch"),
    # --- bixt profile
    ("profile-unknown-model", ["profile", "-m", "nope"], None, "nope"),
    ("profile-negative-len", ["profile", "-m", "bixt_ti_l64_p16", "--seq-len", "-5"], None, "seq-len"),
    ("profile-non-square", ["profile", "-m", "bixt_ti_l64_p16", "--seq-len", "1000"], None, "1024"),
    ("profile-huge-len", ["profile", "-m", "bixt_ti_l64_p16", "--seq-len", str(2**62)], None, "seq"),
    ("profile-batch-zero", ["profile", "-m", "bixt_ti_l64_p16", "--batch-size", "0"], None, "batch"),
    ("profile-dtype", ["profile", "-m", "bixt_ti_l64_p16", "--dtype", "fp8"], None, "fp8"),
    ("profile-device", ["profile", "-m", "bixt_ti_l64_p16", "--device", "tpu"], None, "tpu"),
    ("profile-backend", ["profile", "-m", "bixt_ti_l64_p16", "--backend", "magic"], None, "magic"),
    ("profile-mode", ["profile", "-m", "bixt_ti_l64_p16", "--mode", "all"], None, "mode"),
    ("profile-img-size", ["profile", "-m", "bixt_ti_l64_p16", "--img-size", "100"], None, "100"),
    ("profile-model-arg", ["profile", "-m", "bixt_ti_l64_p16", "--model-arg", "heads=abc"], None, "heads"),
    # --- bixt compare
    ("compare-baseline", ["compare", "--baselines", "transformer", "--out", "{tmp}/c"], None, "transformer"),
    ("compare-lengths", ["compare", "--seq-lens", "1k", "--out", "{tmp}/c"], None, "seq"),
    ("compare-out-file", ["compare", "--seq-lens", "16", "--out", "{file}"], lambda t: {"file": _config(t, "x")},
     "c.yaml"),
    ("compare-timing", ["compare", "--seq-lens", "16", "--timing", "slow", "--out", "{tmp}/c"], None, "timing"),
    ("compare-budget", ["compare", "--seq-lens", "16", "--budget-s", "nan", "--out", "{tmp}/c"], None, "budget"),
    # --- bixt models, and the command line itself
    ("models-family", ["models", "--family", "nosuch"], None, "nosuch"),
    ("models-markup-filter", ["models", "--filter", "[/b]bixt*"], None, "[/b]bixt*"),
    ("unknown-option", ["train", "--learning-rate", "1"], None, "--learning-rate"),
    ("unknown-command", ["fly"], None, "fly"),
]


@pytest.fixture(scope="module", autouse=True)
def _reap_children():
    yield
    for proc in _locked_out.children:
        proc.kill()


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_clean_line(case, tmp_path, monkeypatch):
    name, args, setup, word = case
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/, results/) would land here
    places = {"tmp": tmp_path, **(setup(tmp_path) if setup else {})}
    before = _files(tmp_path)
    result = runner.invoke(app, [a.format(**places) for a in args])
    assert_one_line_error(result, "")
    assert word.lower() in result.output.lower(), result.output
    assert not (tmp_path / "pwned").exists(), "injected code ran"
    created = _files(tmp_path) - before
    assert not [f for f in created if not f.startswith(".triton")], f"{name} left files behind: {sorted(created)}"


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    assert {c[1][0] for c in CASES} >= {"train", "eval", "profile", "compare", "models"}


def test_markup_in_user_text_is_printed_literally():
    """A filter that is also rich markup (`[b]`) works as the shell pattern it is and breaks no printing."""
    result = runner.invoke(app, ["models", "--filter", "[b]ixt_ti_l64_p16"])
    assert result.exit_code == 0 and "bixt_ti_l64_p16" in result.output, result.output


def test_full_disk_while_saving_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """ENOSPC injected into every file write of the run folder: exit 2, one line naming the disk, no temp file."""
    import bixt.io.atomic as atomic

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *TINY, "--out", str(out)])
    assert_one_line_error(result, "space")
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".part")) or p.name.startswith(".tmp")]


def test_out_of_memory_in_profile_is_one_line(monkeypatch):
    import bixt.measure.profile as prof

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 400.00 GiB")

    monkeypatch.setattr(prof, "count", oom)
    result = runner.invoke(app, ["profile", "-m", "bixt_ti_l64_p16", "--seq-len", "196", "--mode", "infer"])
    assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
    assert "memory" in result.output.lower()


def test_eval_refuses_data_whose_class_names_differ_from_the_run(tmp_path):
    """Same number of classes, other names: the labels would mean other classes, so eval refuses (the run saved its
    class names in classes.json)."""
    import json

    out = tmp_path / "run"
    assert runner.invoke(app, ["train", *TINY, "--out", str(out)]).exit_code == 0
    names = json.loads((out / "classes.json").read_text())
    assert len(names) > 1
    ok = runner.invoke(app, ["eval", "--checkpoint", str(out)])
    assert ok.exit_code == 0, ok.output
    (out / "classes.json").write_text(json.dumps(names[::-1]))
    assert_one_line_error(runner.invoke(app, ["eval", "--checkpoint", str(out)]), "class 0")
