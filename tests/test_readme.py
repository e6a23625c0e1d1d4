"""README.md's results section is what benchmarks/readme.py renders from the committed result files."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_module():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "benchmarks" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_section_matches_the_result_files():
    readme = _readme_module()
    text = (ROOT / "README.md").read_text()
    assert readme.updated_readme(text) == text, "README.md is out of date: run python benchmarks/readme.py"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in (ROOT / "README.md").read_text() and "python -m pytest" in ci
