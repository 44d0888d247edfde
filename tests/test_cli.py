"""The command line: thin wrappers, one-line errors with exit code 2, and the README/CI contract."""
import json
import re

from conftest import ROOT, assert_one_line_error
from typer.testing import CliRunner

from bixt_cli.main import app

runner = CliRunner()


def test_models_table_and_json():
    result = runner.invoke(app, ["models", "--filter", "bixt_ti_l64_p16*"])
    assert result.exit_code == 0, result.output
    assert "bixt_ti_l64_p16s4_ft384" in result.output and "15,121,192" in result.output
    result = runner.invoke(app, ["models", "--json", "--family", "bixt"])
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["bixt_ed256LS_l64_p16s8"]["params"] == 26_700_008
    assert rows["bixt_ti_l64_p16s8"]["tokens"] == 784 and rows["bixt_ti_l64_p16s8"]["latents"] == 64
    # GMACs at the default input, the published figures (BIXT-FACTS.md section 2).
    assert rows["bixt_ti_l64_p16"]["gmacs"] == 1.6795 and rows["bixt_ti_l64_p16s4"]["gmacs"] == 16.8092
    result = runner.invoke(app, ["models", "--json", "--filter", "perceiver_ti"])
    (perceiver,) = json.loads(result.stdout)
    assert perceiver["family"] == "perceiver" and perceiver["gmacs"] > 0 and perceiver["latents"] == 64


def test_help_lists_every_command_and_each_command_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    commands = {"train", "eval", "profile", "compare", "models"}
    listed = {ln.split()[1] for ln in result.output.splitlines() if ln.startswith("│ ") and len(ln.split()) > 2}
    assert commands <= listed, result.output
    for command in commands:
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Usage: " in sub.output and "--" in sub.output, sub.output


def test_train_help_names_every_data_kind():
    from bixt.data import SPECS

    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    text = " ".join(result.output.replace("│", " ").split())
    kinds = {spec.split("[")[0].split(":")[0] for spec in SPECS}
    assert {"digits", "shapes", "imagefolder", "listops", "textfolder"} <= kinds
    for kind in kinds:
        assert kind in text, f"--data help omits {kind}"


def test_bad_input_is_one_line_exit_2():
    for args, message in [(["models", "--family", "nope"], "unknown family 'nope'"),
                          (["models", "--filter", "zzz*"], "no model matches 'zzz*'")]:
        assert_one_line_error(runner.invoke(app, args), message)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_test_one():
    main, tests = readme_commands()
    assert "pip install" in main and "bixt " in main
    assert "pip install" in tests and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()
