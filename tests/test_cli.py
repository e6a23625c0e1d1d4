"""``fxdrop audit``: targets as files or modules, shapes, JSON, and one-line errors with status 2."""

from __future__ import annotations

import argparse
import json
import os
import textwrap

import pytest

from fxdrop.harness import audit_cli

ZOO_FILE = os.path.join(os.path.dirname(__file__), "zoo.py")


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="fxdrop audit")
    audit_cli.add_arguments(parser)  # what fxdrop/cli.py does for the subcommand
    code = audit_cli.run(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_file_target_table(capsys):
    code, out, err = run([f"{ZOO_FILE}:MLP", "--input", "64x20"], capsys)
    assert code == 0 and not err
    assert "net.5" in out and "ideal step speedup" in out


def test_module_target_json_and_options(capsys):
    code, out, _ = run(["zoo:T5LayerFF", "--input", "2x5x24", "--json", "--p", "0.3", "--pattern", "block"], capsys)
    data = json.loads(out)
    assert code == 0 and data["model"] == "T5LayerFF" and data["inputs"] == [[2, 5, 24]]
    assert {s["name"]: (s["p"], s["family"]) for s in data["sites"]} == {
        "DenseReluDense.dropout": (0.3, "block"), "dropout": (0.3, "block")}


def test_factory_and_long_inputs(tmp_path, capsys):
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import zoo
        def make():
            return zoo.LSTMLanguageModel(vocab=50)
    """ % os.path.dirname(ZOO_FILE)))
    code, out, _ = run([f"{path}:make", "--input", "6x3:long", "--json"], capsys)
    assert code == 0 and "rnn.layer0" in {s["name"] for s in json.loads(out)["sites"]}


def test_without_inputs(capsys):
    code, out, _ = run([f"{ZOO_FILE}:MLP"], capsys)
    assert code == 0 and "give example inputs" in out


@pytest.mark.parametrize("argv, message", [
    (["missing/file.py:MLP", "--input", "4x20"], "no such file: missing/file.py"),
    ([f"{ZOO_FILE}:Nope", "--input", "4x20"], "has no 'Nope'"),
    ([f"{ZOO_FILE}:MLP", "--input", "4xq"], "bad --input '4xq'"),
    ([f"{ZOO_FILE}:MLP", "--input", "4x20:complex"], "unknown dtype 'complex'"),
    ([f"{ZOO_FILE}:MLP", "--input", "4x21"], "do not fit MLP"),
    (["no_such_package.models:Net"], "cannot import module 'no_such_package.models'"),
    (["zoo:ZOO"], "not an nn.Module class or factory"),
    (["MLP"], "bad TARGET 'MLP'"),
])
def test_errors_are_one_line(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and not out
    assert err.startswith("fxdrop audit: error: ") and message in err and err.count("\n") == 1


def test_through_the_fxdrop_command(capsys):
    from fxdrop.harness import cli

    assert cli.main(["audit", f"{ZOO_FILE}:MLP", "--input", "8x20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "MLP"
    assert cli.main(["audit", f"{ZOO_FILE}:MLP", "--input", "8x"]) == 2


def test_max_dp_option(capsys):
    parser = argparse.ArgumentParser(prog="fxdrop audit")
    audit_cli.add_arguments(parser)
    assert parser.parse_args(["zoo:MLP"]).max_dp == "auto"
    assert parser.parse_args(["zoo:MLP", "--max-dp", "8"]).max_dp == 8
    for bad in ("0", "eight"):
        with pytest.raises(SystemExit):
            parser.parse_args(["zoo:MLP", "--max-dp", bad])
        assert "expected 'auto' or an int >= 1" in capsys.readouterr().err
    code, out, _ = run([f"{ZOO_FILE}:MLP", "--input", "4x20", "--json", "--max-dp", "8"], capsys)
    assert code == 0 and json.loads(out)["options"]["max_dp"] == 8
