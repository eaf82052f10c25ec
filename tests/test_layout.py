"""The package keeps the shape docs/architecture.md describes: layers, lint."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which(args[0])
    if exe is None:
        pytest.fail(f"{args[0]} is not installed: pip install -e '.[test]'")
    return subprocess.run([exe, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_layering_contract_is_kept():
    result = run_tool("lint-imports")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check_is_clean():
    result = run_tool("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_owns_the_layout():
    result = run_tool("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
    marked = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in ROOT.glob("**/*.py")
        if ".git" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "fmt: " + "skip" in line or "fmt: " + "off" in line
    ]
    assert marked == []


def test_modules_and_functions_stay_short():
    """Each file obvious: no module in src/ over 300 lines, no function over 50."""
    import ast

    too_long = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(ROOT)
        if len(text.splitlines()) > 300:
            too_long.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 50:
                    too_long.append(f"{where}:{node.lineno} {node.name}(): {length} lines")
    assert too_long == []
