"""The package's shape: imports run one way (nn <- models <- io, data <- train; models <- measure; train, measure
<- study; bixt_cli on top), the repository is self-contained, and the README's layout names what is there."""
import ast
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

# Layer -> the layers it may import. bixt_baselines is a family package: it sits beside bixt.models.
ALLOWED = {
    "bixt.nn": set(),
    "bixt.models": {"bixt.nn", "bixt_baselines"},
    "bixt_baselines": {"bixt.nn", "bixt.models"},
    "bixt.io": {"bixt.nn", "bixt.models", "bixt_baselines"},
    "bixt.data": {"bixt.nn", "bixt.models", "bixt_baselines"},
    "bixt.measure": {"bixt.nn", "bixt.models", "bixt_baselines", "bixt.io"},
    "bixt.train": {"bixt.nn", "bixt.models", "bixt_baselines", "bixt.io", "bixt.data"},
    "bixt.study": {"bixt.nn", "bixt.models", "bixt_baselines", "bixt.io", "bixt.data", "bixt.train", "bixt.measure"},
}
LAYERS = (*ALLOWED, "bixt_cli")


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (None: the bixt package root, or not ours)."""
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def source_files():
    for folder, package in (("bixt", "bixt"), ("baselines", "bixt_baselines"), ("bixt_cli", "bixt_cli")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield path, ".".join([package, *parts])


def imported_modules(path) -> set[str]:
    """Every module a file imports, at the top or inside a function (a lazy import still runs one way or not)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from bixt import train`
    return names


def test_every_import_in_the_source_runs_down_the_layers():
    wrong = []
    for path, module in source_files():
        own = layer_of(module)
        if own is None or own == "bixt_cli":
            continue
        for name in imported_modules(path):
            target = layer_of(name)
            if target not in (None, own) and target not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(ROOT)} ({own}) imports {name} ({target})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_map_knows_every_subpackage():
    subpackages = {f"bixt.{p.name}" for p in (ROOT / "bixt").iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(ALLOWED) - {"bixt_baselines"}


_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(getattr(package, "__path__", []), sys.argv[1] + "."):
    importlib.import_module(info.name)
if sys.argv[1] == "bixt.models":
    package.list_models()  # loads every family, the baselines included
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layer", [layer for layer in ALLOWED])
def test_importing_a_layer_pulls_in_no_higher_one(layer):
    """In a fresh interpreter, import every module of the layer: nothing of a layer it may not use gets loaded."""
    out = subprocess.run([sys.executable, "-c", _PROBE, layer], capture_output=True, text=True, check=True)
    loaded = {layer_of(m) for m in json.loads(out.stdout.strip().splitlines()[-1])} - {None, layer}
    assert loaded <= ALLOWED[layer], f"{layer} pulled in {sorted(loaded - ALLOWED[layer])}"


def test_nothing_reads_outside_the_repository():
    """Tests, benchmarks and sources use only what the repository holds (the parity fixtures are vendored)."""
    pattern = re.compile(r"""\.\./shared|/\s*["']shared["']|["']shared/""")
    offenders = [str(p.relative_to(ROOT)) for folder in ("bixt", "baselines", "bixt_cli", "tests", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py")
                 if p.name != "test_layout.py" and pattern.search(p.read_text())]
    assert not offenders


def test_readme_layout_names_what_is_there():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S).group(1)
    named = set(re.findall(r"\b((?:bixt|baselines|bixt_cli|tests|benchmarks|results)/[\w./]*)", block))
    assert named, "no paths in the README's layout block"
    for path in named:
        assert (ROOT / path).exists(), f"the README's layout names {path}, which does not exist"
    for sub in (p for p in (ROOT / "bixt").iterdir() if (p / "__init__.py").is_file()):
        modules = {m.stem for m in sub.glob("*.py") if m.stem != "__init__"}
        for module in modules:
            assert f"{module}.py" in block or f"bixt/{sub.name}/{module}.py" in block, \
                f"the README's layout does not mention bixt/{sub.name}/{module}.py"
