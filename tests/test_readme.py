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


def _block_after(text: str, heading: str) -> str:
    rest = text.split(heading, 1)[1]
    return rest.split("```bash\n", 1)[1].split("```", 1)[0]


def test_readme_test_command_is_what_ci_runs():
    """README's test command is .ci/run's, and README's install line installs what CI installs."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    readme = (ROOT / "README.md").read_text()
    tests = _block_after(readme, "## Run the tests").strip()
    assert tests == next(line for line in ci if line.startswith("python -m pytest"))
    install = _block_after(readme, "## Set up and run the main job")
    for line in ci:
        if line.startswith("pip install"):
            assert line.replace(" -q", "") in install, f"README's install does not run: {line}"


def test_the_package_version_is_one_number():
    """pyproject.toml's version is fxdrop.__version__ (results files record the latter)."""
    import tomllib

    import fxdrop

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == fxdrop.__version__
